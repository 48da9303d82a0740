"""Entry point of the pyinstaller binary (and `python -m pyflannel.cni`)."""
import sys

from pyflannel.cni.main import main

sys.exit(main())
