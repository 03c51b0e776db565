"""`python -m gptft.studies [scale=smoke|cpu|paper] [base=<hf_model folder>] [seeds=N] [out=<folder>] [only=a,b]`:
the five studies and learning-vs-forgetting reproduced on one base, each write-up's claims judged across training
seeds, in one report (<out>/REPORT.md, summary.json, figures).

Settings: conf/studies/<scale>.yaml (cpu by default); any of its keys can be set as key=value (seeds=6,
paired_seeds=8, studies.kl_x.overrides=[trainer.max_steps=300]). launcher=local|slurm trains every run as a
submitit job (submitit.slurm_partition=..., submitit.parallel=...) instead of one after another in this process. Output: outputs/studies/<time>/ unless out= names a
folder; given a folder that holds studies, the same command continues them with the settings they started with:
finished runs are kept and nothing trains twice. only= runs some of the studies (the report judges what is there).
"""

from __future__ import annotations

import logging
import sys
import time

from gptft.errors import ConfigError, Interrupted, StoppedEarly

log = logging.getLogger("gptft.studies")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    from gptft.studies.plan import find_base, save_settings, settings, study_jobs, train_job

    started = time.monotonic()
    try:
        cfg, out, wanted = settings(argv)
        out.mkdir(parents=True, exist_ok=True)
        save_settings(cfg, out)
        base = find_base(cfg, out)
        if cfg.base != base:
            cfg.base = base  # a continuing call fine-tunes the same base, whatever outputs/base holds by then
            save_settings(cfg, out)
        from gptft.report import write_report

        failed: list[str] = []
        plan = {name: study_jobs(cfg, name, out, base) for name in wanted}
        fresh = {name: sum(not j.ended for j in jobs) for name, jobs in plan.items()}
        for name, jobs in plan.items():
            log.info("%s: %d runs, %d already ended", name, len(jobs), len(jobs) - fresh[name])
        if cfg.get("launcher"):
            from gptft.studies.plan import submit

            failed += submit(cfg, out, [j for jobs in plan.values() for j in jobs if not j.ended])
        else:
            for job in (j for jobs in plan.values() for j in jobs):
                try:
                    train_job(job)
                except (Interrupted, KeyboardInterrupt):
                    raise
                except StoppedEarly as e:  # diverged: its metrics.json says so, the report leaves it out
                    log.warning("%s: %s", job.folder, e)
                except Exception as e:  # one broken run does not stop the others; the report names it
                    log.exception("%s failed", job.folder)
                    failed.append(f"{job.folder}: {type(e).__name__}: {e}")
        for name in wanted:
            if not fresh[name] and (out / name / "report" / "summary.md").is_file():
                continue  # nothing new: its sweep report stands
            try:
                write_report(out / name)
            except ConfigError as e:
                log.warning("no report for %s: %s", name, e)
        from gptft.studies.write import write_studies_report

        minutes = (time.monotonic() - started) / 60
        report = write_studies_report(cfg, out, wanted, base, failed, minutes)
    except ConfigError as e:
        print(f"gptft.studies: error: {e}", file=sys.stderr)
        return 2
    except (StoppedEarly, KeyboardInterrupt) as stopped:
        print(f"gptft.studies: interrupted: {stopped or 'Ctrl-C'}", file=sys.stderr)
        print(f"gptft.studies: continue with: python -m gptft.studies out={out}", file=sys.stderr)
        return getattr(stopped, "exit_code", 130)
    print(report.read_text().split("\n## ", 1)[0])
    print(f"gptft.studies: {report} written ({minutes:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
