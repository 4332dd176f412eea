"""``python -m COLIPRISlicerLib.cli``: the ``colipri-slicer`` command line."""

from COLIPRISlicerLib.cli import main

if __name__ == "__main__":
    main()
