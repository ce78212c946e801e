"""
Make a run's sharded checkpoint (out_dir/ckpt.dcp/, written with --sharded_checkpoint=True)
into its ckpt.pt, which sample.py, chat.py and export_hf.py read:

$ python consolidate.py --out_dir=out

It needs the whole state in this host's memory, once.
"""

import os

from configurator import configure, run  # first: Ctrl-C while the rest loads exits quietly

from nanogpt import sharded_ckpt
from nanogpt.errors import UserError

# -----------------------------------------------------------------------------
out_dir = "out"  # the run whose ckpt.dcp/ becomes its ckpt.pt
# -----------------------------------------------------------------------------


def main():
    out_dir = configure(globals(), nullable=())["out_dir"]
    folder, path = os.path.join(out_dir, sharded_ckpt.FOLDER), os.path.join(out_dir, "ckpt.pt")
    if not os.path.isdir(folder):
        raise UserError(f"no sharded checkpoint at {folder} (train with --sharded_checkpoint=True)")
    sharded_ckpt.consolidate(folder, path)
    print(f"wrote {path} from {folder}")


if __name__ == "__main__":
    run(main)
