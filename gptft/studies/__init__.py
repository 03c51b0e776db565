"""The studies reproduced in one command (`python -m gptft.studies`): runs, claims with verdicts, one report.

plan.py: the settings of a scale (conf/studies/) and the runs, trained or continued in this process; weights.py: ΔW
and its effective rank; claims.py: each write-up's claims as testable statements and their verdicts; write.py:
REPORT.md and summary.json (the figures are report/'s, like every plot of gptft).
"""
