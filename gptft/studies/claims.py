"""Each write-up's claims as testable statements, the per-seed evidence for each, and its verdict.

A claim is a statement about one number per training seed (a measure, or a difference between two settings that
ran with the same seed: same batches, same base): "greater" than a null value, "less" than it, "within" a margin of
it, or "zero" on every seed. Its effect is the mean over seeds minus the null, with the 95% t interval and the exact
sign-flip p of gptft.report.stats. The verdict, as issue 28 defines it:

- reproduced: the effect points the claimed way and its interval excludes 0 (for "within": the interval lies
  inside ± the margin; for "zero": every seed's value is exactly 0);
- contradicted: the interval excludes 0 the other way (for "within": it lies wholly beyond the margin; for "zero":
  some seed's value is not 0);
- inconclusive otherwise, with what would settle it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptft.report.stats import LEVEL, sign_flip_p, smallest_p, spread

LN_VOCAB = math.log(50257)
KINDS = ("greater", "less", "within", "zero")


@dataclass
class Claim:
    id: str
    study: str
    write_up: str  # what the write-up (or the literature) says, in its words
    statement: str  # the testable statement: one number per seed, and what it should be
    unit: str
    kind: str
    evidence: Callable[[Any], dict[int, float]]  # StudyData → {seed: value}
    null: float = 0.0
    margin: float | None = None
    figures: list[str] = field(
        default_factory=list
    )  # the study report's figures that show it (write-up's own)
    extra: bool = False  # not a write-up's claim: what no write-up measured


@dataclass
class Verdict:
    """The numbers and the verdict of one claim."""

    claim: Claim
    seeds: list[int]
    values: list[float]
    verdict: str
    settle: str = ""
    n: int = 0
    mean: float | None = None
    low: float | None = None
    high: float | None = None
    p: float | None = None
    why_missing: str = ""

    def as_dict(self) -> dict[str, Any]:
        c = self.claim
        return {
            "id": c.id,
            "study": c.study,
            "write_up": c.write_up,
            "statement": c.statement,
            "kind": c.kind,
            "null": c.null,
            "margin": c.margin,
            "unit": c.unit,
            "seeds": self.seeds,
            "values": self.values,
            "n": self.n,
            "effect": "mean of the per-seed values minus the null",
            "mean": self.mean,
            "ci95": None if self.low is None else [self.low, self.high],
            "p_sign_flip": self.p,
            "smallest_possible_p": smallest_p(self.n) if self.n else None,
            "verdict": self.verdict,
            "settle": self.settle,
            "why_missing": self.why_missing or None,
        }


def _more_seeds(n: int) -> str:
    if n < 6:
        return f"more training seeds (n = {n}; 6 or more let the exact test reach p < 0.05)"
    return f"more training seeds than {n}"


def judge(claim: Claim, per_seed: dict[int, float], scale_hint: str = "") -> Verdict:
    """The verdict of `claim` on its per-seed values (see the module's docstring)."""
    if claim.kind not in KINDS:
        raise ValueError(f"unknown kind {claim.kind!r}")
    seeds = sorted(s for s, v in per_seed.items() if v is not None and math.isfinite(v))
    values = [float(per_seed[s]) for s in seeds]
    longer = scale_hint or "a longer run (a larger scale)"
    if not values:
        return Verdict(
            claim, [], [], "inconclusive", f"runs that measure it ({longer})", why_missing="not measured"
        )
    n = len(values)
    effects = [v - claim.null for v in values]
    s = spread(effects)
    p = sign_flip_p(effects) if n > 1 else None
    out = Verdict(claim, seeds, values, "inconclusive", n=n, mean=s.mean, low=s.low, high=s.high, p=p)
    if claim.kind == "zero":
        if all(v == 0 for v in values):
            out.verdict, out.low, out.high = "reproduced", 0.0, 0.0
        else:
            out.verdict = "contradicted"
        return out
    if n < 2:
        out.settle = f"{_more_seeds(n)}: one value has no interval"
        return out
    low, high = s.low, s.high
    if claim.kind == "within":
        m = float(claim.margin or 0.0)
        if -m < low and high < m:
            out.verdict = "reproduced"
        elif low > m or high < -m:
            out.verdict = "contradicted"
        else:
            out.settle = f"{_more_seeds(n)} to narrow the interval to within ±{m:g} or wholly beyond it"
        return out
    sign = 1 if claim.kind == "greater" else -1
    if sign * low > 0 and sign * high > 0:
        out.verdict = "reproduced"
    elif sign * low < 0 and sign * high < 0:
        out.verdict = "contradicted"
    elif s.std == 0 and s.mean == 0:
        out.settle = f"no change on any seed: {longer}"
    else:
        out.settle = f"{_more_seeds(n)}, or {longer}, so the interval excludes 0"
    return out


def _fmt(x: float | None) -> str:
    if x is None:
        return "–"
    if x == 0:
        return "0"
    return f"{x:.3g}" if 1e-3 <= abs(x) < 1e5 else f"{x:.2e}"


def verdict_line(v: Verdict, scale: str) -> str:
    """One Markdown line: the claim, its effect, the verdict, the scale."""
    c = v.claim
    level = round(100 * LEVEL)
    if v.why_missing:
        numbers = f"not measured ({v.why_missing})"
    elif c.kind == "zero":
        numbers = f"largest per-seed value {_fmt(max(abs(x) for x in v.values))} {c.unit} (n = {v.n})"
    else:
        null = f" − {_fmt(c.null)}" if c.null else ""
        ci = "no interval" if v.low is None else f"{level}% CI [{_fmt(v.low)}, {_fmt(v.high)}]"
        p = (
            ""
            if v.p is None
            else f", sign-flip p = {v.p:.3g} (exact; smallest possible {smallest_p(v.n):.3g})"
        )
        numbers = f"effect (mean{null}) {_fmt(v.mean)} {c.unit}, {ci}, n = {v.n}{p}"
    settle = f"; would settle it: {v.settle}" if v.verdict == "inconclusive" and v.settle else ""
    return (
        f"- **{c.id}** {c.statement}: **{v.verdict}**. {numbers}{settle}. "
        f"Scale {scale}; a toy base is not GPT-2."
    )


# ----------------------------------------------------------------------------------------------------------------
# The data a claim reads: the study's groups of runs (gptft.report.replicates), by setting and seed.


@dataclass
class StudyData:
    name: str
    folder: Path
    groups: list[Any]  # gptft.report.replicates.Group
    base: str | None
    swept: dict[str, list[str]]  # key -> values in the study's order

    def group(self, **setting: Any) -> Any | None:
        """The group whose overrides have these values (keys with dots written as __)."""
        want = {k.replace("__", "."): v for k, v in setting.items()}
        for g in self.groups:
            if all(_same(g.overrides.get(k), v) for k, v in want.items()):
                return g
        return None

    def runs(self, **setting: Any) -> dict[int, Any]:
        g = self.group(**setting)
        return dict(g.used) if g is not None else {}


def _same(a: Any, b: Any) -> bool:
    if a is None:
        return False
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-9)
    except (TypeError, ValueError):
        return str(a) == str(b)


def measure(run: Any, name: str) -> float | None:
    """A run's measure: 'change.style_ratio', 'after.ref_kl', 'time.train_s' (gptft.report.replicates), or
    'train.loss_last10_mean', 'params.trainable', 'lengths.answer.mean' read from metrics.json."""
    from gptft.report.replicates import run_measures

    found = run_measures(run).get(name)
    if found is not None:
        return found
    value: Any = run.metrics
    for part in name.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, dict):
        value = value.get("mean")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def per_seed(runs: dict[int, Any], name: str, f: Callable[[float], float] = lambda x: x) -> dict[int, float]:
    out = {}
    for seed, run in runs.items():
        v = measure(run, name)
        if v is not None:
            out[seed] = f(v)
    return out


def paired(
    a: dict[int, Any], b: dict[int, Any], name: str, how: Callable[[float, float], float] = lambda x, y: y - x
) -> dict[int, float]:
    """how(A's value, B's value) per seed both have (default B − A)."""
    va, vb = per_seed(a, name), per_seed(b, name)
    out = {}
    for s in sorted(set(va) & set(vb)):
        try:
            out[s] = how(va[s], vb[s])
        except ZeroDivisionError:
            continue
    return out


def _ratio(x: float, y: float) -> float:
    return y / x


# ----------------------------------------------------------------------------------------------------------------
# The write-ups' claims.


def _lrs(d: StudyData) -> tuple[str, str]:
    lrs = sorted(d.swept.get("optim.lr", []), key=float)
    return (lrs[-1], lrs[0]) if lrs else ("", "")


def _lr(d: StudyData, which: int) -> dict[int, Any]:
    high, low = _lrs(d)
    return d.runs(optim__lr=(high, low)[which]) if high else {}


def _train_loss(run: Any) -> float | None:
    return measure(run, "train.loss_last10_mean") or measure(run, "train.loss_last")


def _lr_train_loss(d: StudyData) -> dict[int, float]:
    high, low = _lr(d, 0), _lr(d, 1)
    out = {}
    for s in sorted(set(high) & set(low)):
        a, b = _train_loss(high[s]), _train_loss(low[s])
        if a is not None and b is not None:
            out[s] = a - b
    return out


def _abs_ratio(x: float, y: float) -> float:
    return abs(y) / abs(x)


def _freeze_ratio_r(d: StudyData) -> dict[int, float]:
    """r = 100 (T_A − T_B) / T_A of the training steps, seed by seed."""
    return paired(
        d.runs(freeze="none"), d.runs(freeze=_b_name(d)), "time.train_s", lambda a, b: 100 * (a - b) / a
    )


def _b_name(d: StudyData) -> str:
    names = [v for v in d.swept.get("freeze", []) if v != "none"]
    return names[0] if names else "upper_qkv"


def _deltas(d: StudyData, run: Any) -> dict[str, dict[str, Any]] | None:
    from gptft.studies.weights import weight_changes

    if d.base is None or not (Path(run.path) / "hf_model").is_dir():
        return None
    patterns = run.metrics.get("config", {}).get("callbacks", {}).get("weight_delta", {}).get("patterns")
    return weight_changes(d.base, run.path, patterns)


def frozen_names(run: Any) -> set[str]:
    """The matrices a run did not train, by the same freezing code its training used (on a model of its shape)."""
    from gptft.models import build_model
    from gptft.tasks.freezing import apply_freeze

    cfg = run.metrics.get("config", {})
    model = build_model(**cfg["model"])
    apply_freeze(model, **cfg["freeze"])
    return {n for n, p in model.named_parameters() if not p.requires_grad}


def _frozen_norm(d: StudyData) -> dict[int, float]:
    """B's largest ‖ΔW‖_F among the tracked matrices its freezing left frozen."""
    out = {}
    for seed, run in d.runs(freeze=_b_name(d)).items():
        deltas = _deltas(d, run)
        if deltas is None:
            continue
        frozen = frozen_names(run)
        norms = [m["norm"] for name, m in deltas.items() if name in frozen]
        if norms:
            out[seed] = max(norms)
    return out


def _qkv_norms(d: StudyData, run: Any) -> dict[int, float] | None:
    from gptft.studies.weights import block_of

    deltas = _deltas(d, run)
    if deltas is None:
        return None
    return {block_of(n): m["norm"] for n, m in deltas.items() if n.endswith("attn.c_attn.weight")}


def _upper_minus_lower(d: StudyData) -> dict[int, float]:
    """In A (everything trains): mean ‖ΔW‖ of the upper half's q/k/v − the lower half's."""
    out = {}
    for seed, run in d.runs(freeze="none").items():
        norms = _qkv_norms(d, run)
        if not norms:
            continue
        blocks = sorted(norms)
        half = len(blocks) // 2
        lower, upper = [norms[b] for b in blocks[:half]], [norms[b] for b in blocks[half:]]
        out[seed] = sum(upper) / len(upper) - sum(lower) / len(lower)
    return out


def _frozen_moves_more(d: StudyData) -> dict[int, float]:
    """Mean ‖ΔW‖ of the upper half's q/k/v: B − A (the write-up: larger in the frozen model)."""
    a, b = d.runs(freeze="none"), d.runs(freeze=_b_name(d))
    out = {}
    for seed in sorted(set(a) & set(b)):
        na, nb = _qkv_norms(d, a[seed]), _qkv_norms(d, b[seed])
        if not na or not nb:
            continue
        upper = sorted(na)[len(na) // 2 :]
        out[seed] = sum(nb[k] for k in upper) / len(upper) - sum(na[k] for k in upper) / len(upper)
    return out


def _lengths(d: StudyData) -> dict[int, float]:
    out = {}
    for seed, run in d.runs().items():
        answer, question = measure(run, "lengths.answer.mean"), measure(run, "lengths.question.mean")
        if answer is not None and question is not None:
            out[seed] = answer - question
    return out


def mean_rank(d: StudyData, run: Any) -> float | None:
    deltas = _deltas(d, run)
    if not deltas:
        return None
    ranks = [m["rank"] for m in deltas.values()]
    return sum(ranks) / len(ranks)


def _rank_full_minus_lora(d: StudyData) -> dict[int, float]:
    a, b = d.runs(freeze="none"), d.runs(freeze="lora")
    out = {}
    for seed in sorted(set(a) & set(b)):
        ra, rb = mean_rank(d, a[seed]), mean_rank(d, b[seed])
        if ra is not None and rb is not None:
            out[seed] = ra - rb
    return out


CLAIMS = [
    # lr study
    Claim(
        "lr-1",
        "lr_sweep",
        "a higher learning rate ends at a lower training loss",
        "the highest lr's final training loss (mean of the last 10 steps) minus the lowest lr's is below 0",
        "nats",
        "less",
        _lr_train_loss,
        figures=["loss.png"],
    ),
    Claim(
        "lr-2",
        "lr_sweep",
        "the style ratio rises with fine-tuning (≈ 52% → 60-61% at lr 1e-4)",
        "the style ratio's change (after − before) at the highest lr is above 0",
        "points",
        "greater",
        lambda d: per_seed(_lr(d, 0), "change.style_ratio"),
        figures=["style_ratio.png"],
    ),
    Claim(
        "lr-3",
        "lr_sweep",
        "the style ratio rises more at a higher lr",
        "the style ratio's change at the highest lr minus its change at the lowest is above 0",
        "points",
        "greater",
        lambda d: paired(_lr(d, 1), _lr(d, 0), "change.style_ratio"),
        figures=["style_ratio.png"],
    ),
    Claim(
        "lr-4",
        "lr_sweep",
        "the lowest lr barely moves the model",
        "the lowest lr's KL to the base (on the reference text) is under a tenth of the highest lr's: "
        "KL(lowest) / KL(highest) < 0.1",
        "(ratio)",
        "less",
        lambda d: paired(_lr(d, 0), _lr(d, 1), "after.ref_kl", _ratio),
        null=0.1,
    ),
    Claim(
        "lr-5",
        "lr_sweep",
        "the lowest lr barely moves the model (its reference loss)",
        "the lowest lr's change of the reference loss is under a tenth of the highest lr's: "
        "|Δref(lowest)| / |Δref(highest)| < 0.1",
        "(ratio)",
        "less",
        lambda d: paired(_lr(d, 0), _lr(d, 1), "change.ref_loss", _abs_ratio),
        null=0.1,
    ),
    # model 5 from scratch
    Claim(
        "scratch-1",
        "scratch",
        "the loss starts at ln(50257) ≈ 10.8",
        "the held-out loss before training lies within ±0.5 of ln 50,257 = 10.82",
        "nats",
        "within",
        lambda d: per_seed(d.runs(), "before.val_loss"),
        null=LN_VOCAB,
        margin=0.5,
        figures=["loss.png"],
    ),
    Claim(
        "scratch-2",
        "scratch",
        "the loss falls from ≈ 10.8 to a level the report states",
        "the held-out loss falls: its change (after − before) is below 0 (the level reached: held-out loss after "
        "training, in the study's table)",
        "nats",
        "less",
        lambda d: per_seed(d.runs(), "change.val_loss"),
        figures=["loss.png"],
    ),
    Claim(
        "scratch-3",
        "scratch",
        "samples go from random tokens to the book's words and punctuation",
        "the style ratio (share of the book's 100 most frequent tokens) rises: change above 0",
        "points",
        "greater",
        lambda d: per_seed(d.runs(), "change.style_ratio"),
    ),
    Claim(
        "scratch-4",
        "scratch",
        "samples go from random tokens to text (repetition of real words)",
        "distinct-2 falls from random tokens' ≈ 1 toward text's: change below 0",
        "",
        "less",
        lambda d: per_seed(d.runs(), "change.distinct_2"),
    ),
    # KL x
    Claim(
        "kl-1",
        "kl_x",
        "at a high lr the x ratio goes to about 1",
        "the x ratio after training at the highest lr is above 0.9",
        "",
        "greater",
        lambda d: per_seed(_lr(d, 0), "after.target_ratio"),
        null=0.9,
        figures=["target_ratio.png"],
    ),
    Claim(
        "kl-2",
        "kl_x",
        "at a low lr the x ratio barely moves",
        "the x ratio's change at the lowest lr lies within ±0.05",
        "",
        "within",
        lambda d: per_seed(_lr(d, 1), "change.target_ratio"),
        margin=0.05,
        figures=["target_ratio.png"],
    ),
    Claim(
        "kl-3",
        "kl_x",
        "the ordinary loss on held-out text rises as the x ratio rises (what the target costs)",
        "the rise of the ordinary (cross-entropy) loss on the reference text is larger at the highest lr than at "
        "the lowest: Δref(highest) − Δref(lowest) > 0",
        "nats",
        "greater",
        lambda d: paired(_lr(d, 1), _lr(d, 0), "change.ref_loss"),
    ),
    # targeted freezing
    Claim(
        "freeze-1",
        "freezing",
        "the frozen model trains fewer parameters",
        "B's trainable parameters minus A's are below 0",
        "parameters",
        "less",
        lambda d: paired(d.runs(freeze="none"), d.runs(freeze=_b_name(d)), "params.trainable"),
    ),
    Claim(
        "freeze-2",
        "freezing",
        "the frozen model's fit takes less time",
        "the saving r = 100 (T_A − T_B) / T_A of the training steps is above 0",
        "%",
        "greater",
        _freeze_ratio_r,
    ),
    Claim(
        "freeze-3",
        "freezing",
        "the saving is r ≈ 25% (120 s vs 89 s)",
        "r of the training steps lies within 25 ± 10%",
        "%",
        "within",
        _freeze_ratio_r,
        null=25.0,
        margin=10.0,
    ),
    Claim(
        "freeze-4",
        "freezing",
        "the frozen model's loss falls more slowly",
        "B's change of the held-out loss minus A's is above 0 (B falls less)",
        "nats",
        "greater",
        lambda d: paired(d.runs(freeze="none"), d.runs(freeze=_b_name(d)), "change.val_loss"),
        figures=["loss.png", "loss_b_vs_a.png"],
    ),
    Claim(
        "freeze-5",
        "freezing",
        "frozen matrices do not change: ‖ΔW‖ = 0",
        "B's largest ‖ΔW‖_F (final − base, fp64) among the tracked matrices its freezing left frozen is exactly 0",
        "",
        "zero",
        _frozen_norm,
        figures=["weight_delta.png"],
    ),
    Claim(
        "freeze-6",
        "freezing",
        "the q/k/v weights change more in the upper blocks than in the lower",
        "in A (everything trains), the mean ‖ΔW‖_F of the upper half's q/k/v minus the lower half's is above 0",
        "",
        "greater",
        _upper_minus_lower,
        figures=["weight_delta.png"],
    ),
    Claim(
        "freeze-7",
        "freezing",
        "‖ΔW‖ is larger in the frozen model",
        "the mean ‖ΔW‖_F of the upper half's q/k/v in B minus in A is above 0",
        "",
        "greater",
        _frozen_moves_more,
        figures=["weight_delta.png"],
    ),
    # instruction tuning
    Claim(
        "instruct-1",
        "instruct",
        "answers are longer than questions",
        "the mean answer length minus the mean question length (tokens, training pairs) is above 0",
        "tokens",
        "greater",
        _lengths,
    ),
    Claim(
        "instruct-2",
        "instruct",
        "the masked loss on the answers falls",
        "the held-out loss on answer tokens only changes by less than 0",
        "nats",
        "less",
        lambda d: per_seed(d.runs(), "change.val_loss"),
        figures=["loss.png"],
    ),
    Claim(
        "instruct-3",
        "instruct",
        "the tuned model answers held-out questions (exact match before vs after)",
        "exact match on GSM8K test questions rises: change above 0",
        "",
        "greater",
        lambda d: per_seed(d.runs(), "change.exact_match"),
    ),
    # what no write-up measured
    Claim(
        "extra-1",
        "learn_forget",
        "full fine-tuning's updates are of far higher rank than LoRA's (Biderman et al.)",
        "the mean effective rank of ΔW (singular values holding 90% of ‖ΔW‖²) over the tracked matrices: full "
        "fine-tuning minus LoRA is above 0",
        "ranks",
        "greater",
        _rank_full_minus_lora,
        extra=True,
    ),
    Claim(
        "extra-2",
        "learn_forget",
        "LoRA forgets less than full fine-tuning (Biderman et al.)",
        "LoRA's rise of the reference loss minus full fine-tuning's is below 0",
        "nats",
        "less",
        lambda d: paired(d.runs(freeze="none"), d.runs(freeze="lora"), "change.ref_loss"),
        figures=["learn_forget.png"],
        extra=True,
    ),
    Claim(
        "extra-3",
        "learn_forget",
        "LoRA learns less than full fine-tuning (Biderman et al.)",
        "LoRA's change of the held-out loss minus full fine-tuning's is above 0 (it falls less)",
        "nats",
        "greater",
        lambda d: paired(d.runs(freeze="none"), d.runs(freeze="lora"), "change.val_loss"),
        figures=["learn_forget.png"],
        extra=True,
    ),
]
