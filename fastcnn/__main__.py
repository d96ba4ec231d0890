"""``python -m fastcnn``: the ``fastcnn`` command."""
from .cli import main

if __name__ == "__main__":
    main()
