"""``python -m pagedserve`` is ``serve``."""

from pagedserve.cli import serve

serve()
