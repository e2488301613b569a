"""Look for the ptxas miscompile behind Marlin's "illegal instruction" on sm_90 (IST-DASLab/marlin#44):
an LDGSTS (cp.async) whose memory descriptor desc[URn] is read from a uniform register that nothing in
the function ever writes (the createpolicy that should fill it was dropped).

  cuobjdump -sass marlin_cuda*.so | python scripts/marlin_sass_check.py     (or: ... marlin_sass_check.py FILE.sass)

Prints, per kernel, the LDGSTS count and the descriptor registers read but never written; exits 1 if any.
"""

import re
import sys

INSN = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
DESC = re.compile(r"desc\[(UR\d+)\]")


def check(text: str) -> int:
    bad = 0
    for block in re.split(r"\n\s*Function : ", text)[1:]:
        name = block.split("\n", 1)[0].strip()
        written, uses, ldgsts = set(), {}, 0
        for m in INSN.finditer(block):
            op, args = m.group(1), m.group(2)
            first = args.split(",")[0].strip()
            if re.fullmatch(r"UR\d+", first) and not op.startswith(("ST", "RED", "ATOM")):
                n = int(first[2:])
                written.add(n)
                if ".64" in op or op.startswith(("ULDC.64", "UMOV.64")):
                    written.add(n + 1)
            if op.startswith("LDGSTS"):
                ldgsts += 1
                for ur in DESC.findall(args):
                    uses[ur] = uses.get(ur, 0) + 1
        undefined = {ur: c for ur, c in uses.items() if int(ur[2:]) not in written}
        if ldgsts:
            status = "UNDEFINED DESCRIPTOR " + ", ".join(f"{u} x{c}" for u, c in sorted(undefined.items())) if undefined else "ok"
            print(f"{name[:90]:90s} LDGSTS {ldgsts:3d}  {status}")
        bad += bool(undefined)
    print(f"{bad} kernel(s) with an LDGSTS descriptor that is never written")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(check(open(sys.argv[1]).read() if len(sys.argv) > 1 else sys.stdin.read()))
