"""``python -m pagedserve`` is ``serve``."""

from pagedserve.cli import serve

# Guarded: a spawned engine process re-imports the parent's main module under another name.
if __name__ == "__main__":
    serve()
