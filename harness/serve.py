"""Start ComfyUI's own main.py as a server, with the same torchvision / torchaudio stand-ins as the
in-process runtime.

python -m harness.serve PATH/TO/main.py [ComfyUI arguments...]
"""

import os
import runpy
import sys

from harness import stand_ins

if __name__ == "__main__":
    main_py = sys.argv[1]
    sys.argv = [main_py] + sys.argv[2:]
    sys.path.insert(0, os.path.dirname(main_py))  # as `python main.py` would
    stand_ins.install()
    runpy.run_path(main_py, run_name="__main__")
