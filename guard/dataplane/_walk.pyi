"""Types of the native module built from guard/_walk.c."""

from _typeshed import ReadableBuffer

Output = tuple[str, int, tuple[int, ...], int, int, int]
"""(name, dtype, shape, from_content, offset, length)"""

def walk_predict_response(
    data: ReadableBuffer, /
) -> tuple[bytes | None, tuple[Output, ...], dict[str, Output]] | None: ...
