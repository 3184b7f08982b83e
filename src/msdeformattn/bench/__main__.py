"""``python -m msdeformattn.bench`` (what ``make bench`` runs): see :mod:`.command`."""

from .command import main

if __name__ == "__main__":
    main()
