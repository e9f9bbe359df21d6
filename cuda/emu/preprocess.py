"""Rewrites a .cu source for the CPU emulation: kernel<<<cfg>>>(args) -> emu_launch(kernel, cfg)(args),
extern __shared__ arrays -> the block's dynamic shared buffer."""

import re
import sys

src = open(sys.argv[1]).read()
src = re.sub(r"([A-Za-z_][\w:]*(?:<[^<>;]*>)?)\s*<<<(.*?)>>>\s*\(", r"emu_launch(\1, \2)(", src, flags=re.S)
src = re.sub(r"extern\s+__shared__\s+(\w+)\s+(\w+)\[\];", r"\1* \2 = reinterpret_cast<\1*>(emu::dyn_smem());", src)
open(sys.argv[2], "w").write(f'#line 1 "{sys.argv[1]}"\n' + src)
