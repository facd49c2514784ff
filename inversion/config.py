"""TrainConfig: every option of a textual-inversion run as one frozen, checked value.

Built from argv (`TrainConfig.from_argv`, the `make train` / `python -m inversion.train` options), from a run
folder (`TrainConfig.from_run`, RESUME), or directly in Python (figures, the demo, benchmarks). Every instance is
checked when it is made: a bad value is an InversionError naming the setting, the value and the limit. Limits
that depend on the model (sizes, the text context) are checked by `resolve`, once the model is known.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from inversion import data as D
from inversion import stopping
from inversion.embedding import InversionError
from inversion.models import choice_rules
from inversion.rundir import RunDir
from inversion.templates import max_vectors
from ldm import cli
from ldm.precision import DTYPES

log = logging.getLogger(__name__)

BASE_LR = 5e-3
# --recipe: the defaults a recipe gives the options the user left out. `official` is the paper's; `fast` is
# what experiments/instances/speed.py measured to reach the bar in fewer image-passes (`make bench-concepts`,
# experiments/RESULTS.md § instances-speed): the same steps at four times the step size.
RECIPES = {"official": {"lr": BASE_LR}, "fast": {"lr": 4 * BASE_LR}}
RECIPE = "fast"
STEPS = 6100
SEED = 23
SAVE_EVERY = 500
PROGRESSIVE_EVERY = 2000  # official PROGRESSIVE_SCALE
FAMILY_DEFAULTS = {"ldmbert": {"batch": 4, "size": 256}}  # the paper's LDM-1.4B config
SD_DEFAULTS = {"batch": 2}  # v1-finetune.yaml; size: the model's own
PRECISIONS = tuple(DTYPES)
RESUMABLE = (
    "steps",
    "max_steps",
    "save_every",
    "val_every",
    "device",
    "no_progress",
    "max_bad_steps",
    "deterministic",
)  # what RESUME may change


@dataclass(frozen=True)
class TrainConfig:
    concept: str
    model: str | None = None
    ckpt: str | None = None
    steps: int = STEPS
    auto: bool = False  # STEPS=auto: stop by the rule, at most max_steps (the command line's default)
    max_steps: int = STEPS
    stop_every: int | None = None  # None: stopping.every(max_steps)
    stop_window: int = stopping.WINDOW
    stop_threshold: float = stopping.THRESHOLD
    batch: int | None = None  # None: the model family's (SD 2, LDM 4)
    accum: int = 1
    recipe: str = RECIPE
    lr: float | None = None  # None: the recipe's
    no_scale_lr: bool = False
    weight_decay: float = 1e-2
    init: str = "sculpture"
    init_words: str | None = None
    random_init: bool = False
    init_search: int = 0  # check this many vocabulary words against INIT and start from the best (0: INIT)
    token: str | None = None  # None: <concept folder name>
    vectors: int = 1
    progressive: int = 0
    per_image_tokens: bool = False
    reg_weight: float = 0.0
    templates: str = "object"
    size: int | None = None  # None: the model's
    center_crop: bool = False
    repeats: int = 100
    flip_p: float = 0.5
    seed: int = SEED
    out: str | None = None  # None: runs/<concept>-<time>
    overwrite: bool = False
    save_every: int = SAVE_EVERY
    val_every: int | None = None  # None: save_every
    val_prompts: str = ""
    val_n: int = 2
    val_steps: int | None = None
    precision: str = "fp32"
    checkpointing: int = 0
    resume: str | None = None
    latent_cache: str = str(D.DEFAULT_CACHE)
    no_latent_cache: bool = False
    device: str = "auto"
    max_bad_steps: int = 25
    deterministic: bool = False
    no_progress: bool = False

    def __post_init__(self) -> None:
        self.check()

    # -- making one -------------------------------------------------------------------------------------------

    @classmethod
    def from_argv(cls, argv: list[str] | None) -> TrainConfig:
        """The command line: given options over the defaults, or over a resumed run's saved options."""
        given = vars(build_parser().parse_args(argv))
        if "steps" in given or not given.get("resume"):  # a new run without STEPS stops by itself
            given.update(parse_steps(given.pop("steps", "auto"), given.get("max_steps", STEPS)))
        if given.get("resume"):
            return cls.from_run(given["resume"], **{k: v for k, v in given.items() if k in RESUMABLE + ("auto",)})
        if not given.get("concept"):
            raise InversionError("give CONCEPT= (a folder under experiments/concepts/ or a path)")
        return cls(**given)

    @classmethod
    def from_run(cls, run: str | Path, **overrides) -> TrainConfig:
        """The options saved in RUN/args.json, with the few that RESUME may change."""
        run = Path(run)
        path = run / "args.json"
        if not path.is_file():
            raise InversionError(f"RESUME={run}: no args.json there; is it a training run directory?")
        names = {f.name for f in dataclasses.fields(cls)}
        saved = {k: v for k, v in RunDir(run).options().items() if k in names}
        config = cls(**{**saved, **overrides, "resume": str(run), "out": str(run)})
        if config.auto and ("max_steps" in overrides or overrides.get("auto")):
            config = config.replace(steps=config.max_steps)
        return config

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def options(self) -> dict:
        return dataclasses.asdict(self)

    # -- checks -----------------------------------------------------------------------------------------------

    def check(self) -> None:
        """Every limit that does not depend on the model; one line naming the setting."""
        init_words = [w.strip() for w in self.init_words.split(",")] if self.init_words else None
        cli.check(
            [
                cli.at_least("--max-steps", self.max_steps),
                cli.at_least("STEPS", self.steps),
                (self.recipe in RECIPES, f"unknown RECIPE={self.recipe!r}; choose one of {', '.join(RECIPES)}"),
                cli.at_least("--stop-every", self.stop_every),
                cli.at_least("--stop-window", self.stop_window, 2),
                (0 < self.stop_threshold < 1, f"--stop-threshold {self.stop_threshold} must be between 0 and 1"),
                cli.at_least("ACCUM", self.accum),
                cli.at_least("BATCH", self.batch),
                cli.at_least("VECTORS", self.vectors),
                (
                    self.lr is None or (self.lr > 0 and math.isfinite(self.lr)),
                    f"LR={self.lr} must be a positive number",
                ),
                cli.finite("--weight-decay", self.weight_decay, 0.0),
                cli.at_least("SAVE_EVERY", self.save_every),
                cli.at_least("--val-every", self.val_every, 0),
                cli.at_least("--val-n", self.val_n),
                cli.at_least("--val-steps", self.val_steps),
                (self.progressive >= 0, f"--progressive {self.progressive} must be ≥ 0"),
                (self.repeats >= 1, f"--repeats {self.repeats} must be at least 1"),
                (0.0 <= self.flip_p <= 1.0, f"--flip-p {self.flip_p} must be in [0, 1]"),
                (self.size is None or self.size >= 8, f"SIZE={self.size} is too small (at least 8)"),
                (
                    self.reg_weight >= 0 and math.isfinite(self.reg_weight),
                    f"--reg-weight {self.reg_weight} must be ≥ 0",
                ),
                cli.at_least("--max-bad-steps", self.max_bad_steps),
                cli.seed_rule("SEED", self.seed),
                (
                    self.precision in PRECISIONS,
                    f"unknown PRECISION={self.precision!r}; choose one of {', '.join(PRECISIONS)}",
                ),
                *choice_rules(self.model, self.ckpt),
                (bool(self.init.strip()), f"INIT={self.init!r} must be a word"),
                (init_words is None or all(init_words), f"--init-words {self.init_words!r} has an empty word"),
                (
                    init_words is None or len(init_words) <= self.vectors,
                    f"--init-words gives {len(init_words or [])} words for VECTORS={self.vectors}; give at most "
                    f"one word per vector (or raise VECTORS to {len(init_words or [])})",
                ),
                (
                    not Path(self.latent_cache).exists() or Path(self.latent_cache).is_dir(),
                    f"--latent-cache {self.latent_cache} is a file, not a folder",
                ),
                (
                    not (self.random_init and self.init_words),
                    "--random-init and --init-words exclude each other; give one",
                ),
                (self.init_search >= 0, f"--init-search {self.init_search} must be ≥ 0"),
                (
                    not (self.init_search and (self.random_init or self.init_words)),
                    "--init-search starts from INIT's row; it excludes --random-init and --init-words",
                ),
                (
                    self.token is None or (self.token.strip() and not any(c.isspace() for c in self.token)),
                    f"TOKEN={self.token!r} must be one word without spaces, e.g. '<my-concept>'",
                ),
            ],
            InversionError,
        )

    def check_context(self, tokenizer, templates: tuple[str, ...], duals: tuple[str, ...]) -> None:
        """VECTORS (with per-image tokens) must fit the text context in every template and validation prompt."""
        fits = max_vectors(tokenizer, templates, duals if self.per_image_tokens else ())
        fits_val = max_vectors(tokenizer, tuple(p.replace("S*", "{}") for p in self.validation_prompts))
        what = f"TEMPLATES={self.templates}{' with --per-image-tokens' if self.per_image_tokens else ''}"
        if fits_val < min(fits, self.vectors):
            fits, what = fits_val, "VAL_PROMPTS"
        if self.vectors > fits:
            limit = f"the largest VECTORS that fits is {fits}" if fits >= 1 else f"no vector fits: shorten {what}"
            raise InversionError(
                f"VECTORS={self.vectors} does not fit the {tokenizer.context_length}-token text "
                f"context with {what}; {limit}"
            )

    # -- what the model decides -------------------------------------------------------------------------------

    def resolve(self, model, concept: Path, cpu: bool) -> TrainConfig:
        """Fill the defaults that depend on the model and the device, and check the limits they set."""
        defaults = FAMILY_DEFAULTS.get(model.config.text.get("kind"), SD_DEFAULTS)
        precision = self.precision
        if precision == "fp16" and cpu:
            log.warning("PRECISION=fp16 is not supported on the CPU; using fp32")
            precision = "fp32"
        resolved = self.replace(
            lr=self.lr or RECIPES[self.recipe]["lr"],
            stop_every=self.stop_every or stopping.every(self.max_steps),
            batch=self.batch or defaults["batch"],
            size=self.size or defaults.get("size", model.config.image_size),
            token=self.token or f"<{concept.name}>",
            precision=precision,
        )
        cli.check([cli.multiple_rule("SIZE", resolved.size, model.latent_factor)], InversionError)
        return resolved

    @property
    def validation_every(self) -> int:
        return self.save_every if self.val_every is None else self.val_every

    @property
    def validation_prompts(self) -> list[str]:
        """'a photo of S*' and every VAL_PROMPTS entry (S* marks the word)."""
        return ["a photo of S*"] + [p.strip() for p in self.val_prompts.split(";") if p.strip()]

    def init_word_list(self) -> list[str] | None:
        if self.random_init:
            return None
        return [w.strip() for w in self.init_words.split(",") if w.strip()] if self.init_words else [self.init]

    def scaled_lr(self, world: int) -> float:
        """The official `scale_lr`: base LR × batch × accumulation × processes (unless --no-scale-lr)."""
        return self.lr if self.no_scale_lr else self.lr * self.batch * self.accum * world


def as_flags(changes: dict) -> list[str]:
    """TrainConfig changes as the `make train ARGS=…` flags that give them ({"vectors": 3} → --vectors 3)."""
    flags = []
    for key, value in changes.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is not False and value is not None:
            flags += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    return flags


def parse_steps(value: str | int, max_steps: int) -> dict:
    """STEPS: a whole number (exactly that many steps) or 'auto' (stop by itself, at most MAX_STEPS)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return {"steps": max_steps, "auto": True}
    try:
        return {"steps": int(value), "auto": False}
    except (TypeError, ValueError):
        raise InversionError(f"STEPS={value!r} must be a whole number or auto") from None


def build_parser() -> argparse.ArgumentParser:
    """The command line; an option left out keeps TrainConfig's default (or, with RESUME, the run's value)."""
    p = cli.ArgumentParser(
        prog="python -m inversion.train",
        description="Textual inversion: learn one new word.",
        argument_default=argparse.SUPPRESS,
    )
    a = p.add_argument
    a("--concept", help="folder under experiments/concepts/ or a path (CONCEPT=)")
    a("--model", help="sd15 | sd21 | sd21-v | shapes | tiny (MODEL=, default sd15)")
    a("--ckpt", help="checkpoint file or diffusers folder, overrides --model (CKPT=)")
    a("--steps", help="optimiser steps, or 'auto': stop by itself, at most MAX_STEPS (STEPS=, default auto)")
    a("--max-steps", type=int, help=f"cap of a STEPS=auto run (MAX_STEPS=, default {STEPS})")
    a(
        "--recipe",
        choices=tuple(RECIPES),
        help=f"fast: LR × 4, measured in make bench-concepts | official: the paper's (RECIPE=, default {RECIPE})",
    )
    a(
        "--stop-every",
        type=int,
        help=f"STEPS=auto: evaluate the fixed-batch objective every N steps (default MAX_STEPS // "
        f"{stopping.EVALUATIONS})",
    )
    a("--stop-window", type=int, help=f"STEPS=auto: evaluations in the recent window (default {stopping.WINDOW})")
    a(
        "--stop-threshold",
        type=float,
        help=f"STEPS=auto: stop when recent/overall variance < this (default {stopping.THRESHOLD})",
    )
    a("--batch", type=int, help="images per step per process (BATCH=; SD 2, LDM 4)")
    a("--accum", type=int, help="gradient accumulation micro-batches (ACCUM=, default 1)")
    a(
        "--lr",
        type=float,
        help=f"base learning rate (LR=, default the recipe's: official {BASE_LR}, fast {RECIPES['fast']['lr']})",
    )
    a("--no-scale-lr", action="store_true", help="use LR as is instead of LR × batch × accum × world")
    a("--weight-decay", type=float, help="AdamW weight decay (official: torch default 1e-2)")
    a("--init", help="one-token init word (INIT=, official default 'sculpture')")
    a("--init-words", help="comma-separated one-token words spread over the vectors")
    a("--random-init", action="store_true", help="random init scaled to the token table's mean norm")
    a(
        "--init-search",
        type=int,
        help="measure INIT and the N vocabulary words a first-order estimate ranks best on the fixed batch; start "
        "from the best (default 0: INIT)",
    )
    a("--token", help="the new word (TOKEN=, default '<concept>')")
    a("--vectors", type=int, help="vectors per token (VECTORS=, default 1)")
    a(
        "--progressive",
        type=int,
        nargs="?",
        const=PROGRESSIVE_EVERY,
        help=f"add a vector every N steps (paper ablation; bare flag: {PROGRESSIVE_EVERY})",
    )
    a("--per-image-tokens", action="store_true", help="also learn one token per image (official option)")
    a("--reg-weight", type=float, help="embedding regularisation toward the init (official)")
    a("--templates", help="object | style | file.txt with '{}' (TEMPLATES=, default object)")
    a("--size", type=int, help="training resolution in pixels (SIZE=; default the model's)")
    a("--center-crop", action="store_true", help="centre square crop before resizing")
    a("--repeats", type=int, help="dataset repeats per epoch (official 100)")
    a("--flip-p", type=float, help="horizontal flip probability (default 0.5)")
    a("--seed", type=int, help=f"SEED= (default {SEED})")
    a("--out", help="run directory (OUT=, default runs/<concept>-<time>)")
    a("--overwrite", action="store_true", help="allow an OUT that already holds files")
    a("--save-every", type=int, help=f"save files + validation every N steps (SAVE_EVERY=, default {SAVE_EVERY})")
    a("--val-every", type=int, help="validation grid every N steps (0: never; default SAVE_EVERY)")
    a("--val-prompts", help="';'-separated extra validation prompts; S* is the word (VAL_PROMPTS=)")
    a("--val-n", type=int, help="validation images per prompt (default 2)")
    a("--val-steps", type=int, help="validation sampling steps (default the model's)")
    a("--precision", choices=PRECISIONS, help="fp32 | bf16 | fp16 (PRECISION=)")
    a("--checkpointing", type=int, choices=(0, 1), help="gradient checkpointing (CHECKPOINTING=1)")
    a("--resume", help="continue the run in this directory (RESUME=)")
    a("--latent-cache", help="latent cache folder ('' keeps it in memory)")
    a("--no-latent-cache", action="store_true", help="encode with the VAE every step (as the official code)")
    a("--device", help="auto | cpu | cuda | mps (DEVICE=)")
    a("--max-bad-steps", type=int, help="stop after this many NaN/inf steps in a row (default 25)")
    a(
        "--deterministic",
        action="store_true",
        help="deterministic algorithms and reference kernels (see ldm/determinism.py for what each device promises)",
    )
    a("--no-progress", action="store_true", help="no tqdm bar")
    return p
