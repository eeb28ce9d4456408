"""The console a newcomer reads: run a command (by default `make demo`, into a temporary DEMO_OUT), show its output
as it comes, and count the lines that carry a WARNING. Exits 1 when they reach --max (20), so the count is a check,
not a number to eyeball. vLLM's and torch's own logs go to engine.log in the run folder (OPSD_VERBOSE=1 brings them
back), so they are not counted unless asked for.

Run:
    python bench/console_warnings.py                           # make demo: fewer than 20 WARNING lines
    python bench/console_warnings.py --log results/bench/console_warnings.txt
    python bench/console_warnings.py -- python train.py --steps 2  # any other command
"""

import argparse
import datetime
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max", type=int, default=20, help="fail at this many WARNING lines or more")
    ap.add_argument("--log", help="also write the summary (and the WARNING lines) to this file")
    ap.add_argument("command", nargs="*", help="the command (after --); default: make demo")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = args.command or ["make", "demo", f"DEMO_OUT={os.path.join(tmp, 'demo')}"]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace")
        lines = []
        for line in proc.stdout:
            sys.stdout.write(line)
            lines.append(line.rstrip("\n"))
        rc = proc.wait()
    # a line with carriage-return progress updates is one line, as a terminal leaves it
    warn, total = [ln for ln in lines if "WARNING" in ln or "Warning:" in ln], len(lines)
    summary = (f"{' '.join(cmd)}: exit {rc}, {len(warn)} WARNING lines among {total} "
               f"({'under' if len(warn) < args.max else 'not under'} {args.max})")
    print(summary)
    for ln in warn:
        print("  " + ln[:200])
    if args.log:
        with open(args.log, "w") as f:
            f.write(f"# python bench/console_warnings.py  ({datetime.date.today()})\n{summary}\n")
            f.writelines("  " + ln[:200] + "\n" for ln in warn)
    return 1 if rc or len(warn) >= args.max else 0


if __name__ == "__main__":
    sys.exit(main())
