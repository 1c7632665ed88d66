"""SJD and ZipAR settings: what `--speculative-config '{"method": "sjd" | "zipar", ...}'` accepts.

vLLM's SpeculativeConfig knows no "sjd" method and forbids unknown keys, so the
settings are split at start-up (patches/speculative_config.py): vLLM gets a
plain `custom_class` configuration, and these settings travel to every process
in `VllmConfig.additional_config["sjd"]`.
"""

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from vllm_sjd.contract import (
    SJD2_METHOD,
    SJD2_SETTINGS_CONFIG_KEY,
    SJD_SETTINGS_CONFIG_KEY,
    SPECULATIVE_METHOD,
    ZIPAR_METHOD,
    ZIPAR_SETTINGS_CONFIG_KEY,
)
from vllm_sjd.core.drafting import Drafting
from vllm_sjd.core.window import InitialDrafts

DynamicWindow = Literal["unseeded", "all", "off"]
PROPOSER_CLASS = "vllm_sjd.proposer.SJDProposer"
MIN_WINDOW, MAX_WINDOW = 1, 64
DEFAULT_WINDOW = 16

# Keys of the speculative config that vLLM handles itself and SJD passes on.
# num_speculative_tokens_per_batch_size: vLLM's [start_bs, end_bs, K] table;
# its scheduler picks each step's K, the SJD runner drafts that many (and
# SJD's own dynamic window stays off).
VLLM_KEYS = frozenset(
    {"method", "num_speculative_tokens", "max_model_len", "num_speculative_tokens_per_batch_size"}
)


def window_in_range(value: int) -> int:
    if not MIN_WINDOW <= value <= MAX_WINDOW:
        raise ValueError(f"must be between {MIN_WINDOW} and {MAX_WINDOW}")
    return value


class SJDConfigError(ValueError):
    """A bad SJD setting; the message names the setting and what is allowed."""


class SJDConfig(BaseModel):
    """Validated SJD settings. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # K: drafts verified per forward pass.
    num_speculative_tokens: int = DEFAULT_WINDOW
    # How slots with no recycled draft are filled: "uniform" over the allowed
    # tokens (the paper's choice), "last_distribution" (sampled from the
    # newest verified row), or "above" (in an image, the row of the cell one
    # image row up; uniform where there is none). Default: the best measured
    # (benchmarks/RESULTS.md, "Coupled drafts").
    initial_drafts: InitialDrafts = "above"
    # How a re-drafted slot relates to its previous draft: "independent"
    # (vanilla SJD), "coupled" (maximal coupling: keeps it when it can) or
    # "gumbel" (noise fixed per position); all lossless (core/drafting.py).
    drafting: Drafting = "coupled"
    # Which requests take a window K chosen per step from the load (the
    # batch, the forward-cost curve measured at start-up, the acceptance per
    # window slot; num_speculative_tokens is the ceiling): "unseeded" (seeded
    # requests keep K, so their images do not depend on the load), "all", or
    # "off". vLLM's num_speculative_tokens_per_batch_size, when given, wins.
    # "unseeded" by default: on the demo model it kept SJD's gain with one
    # image in flight and plain AR's throughput under load (benchmarks/RESULTS.md,
    # "A window that adapts to load").
    dynamic_num_speculative_tokens: DynamicWindow = "unseeded"
    # L: tokens (at most) a pass also feeds at the start of the next image row, at
    # their raster positions (ZipAR's row-parallel prediction). They are
    # never verified; what the model predicts there becomes the q of those
    # cells' initial drafts when the window reaches them, so SJD stays
    # lossless (core/row_lookahead.py). 0: off. vLLM schedules K + L drafts.
    row_lookahead: int = 0
    # On a CUDA device (and not under vLLM's enforce_eager), run the verifier's
    # and the window's tensor work as compiled graphs (core/compiled.py): about
    # 40% fewer kernel launches a step; the first steps of each new batch shape
    # wait for the compiler (2-20 s). Off by default: measured on an H200
    # without vLLM only (benchmarks/RESULTS.md, "Compiled").
    compile_step: bool = False
    # Proposer class (dotted path); a subclass may change how windows are built.
    proposer: str = PROPOSER_CLASS

    @field_validator("num_speculative_tokens")
    @classmethod
    def _window_in_range(cls, value: int) -> int:
        return window_in_range(value)

    @field_validator("row_lookahead")
    @classmethod
    def _lookahead_in_range(cls, value: int) -> int:
        if not 0 <= value <= MAX_WINDOW:
            raise ValueError(f"must be between 0 and {MAX_WINDOW}")
        return value

    @classmethod
    def parse(cls, settings: dict[str, Any]) -> "SJDConfig":
        """Validate user settings, raising SJDConfigError with a clear message."""
        try:
            return cls(**settings)
        except ValidationError as err:
            raise SJDConfigError(_describe(err)) from None

    @classmethod
    def from_additional_config(cls, additional_config: Any) -> "SJDConfig":
        settings = (additional_config or {}).get(SJD_SETTINGS_CONFIG_KEY)
        if settings is None:
            raise SJDConfigError(
                "SJD settings are missing from additional_config; start the engine "
                'with speculative_config={"method": "sjd", ...} and the vllm-sjd '
                "plugin installed"
            )
        return cls.parse(settings)


def _allowed_values(field: str) -> str:
    if field == "initial_drafts":
        return "one of " + ", ".join(repr(v) for v in get_args(InitialDrafts))
    if field == "drafting":
        return "one of " + ", ".join(repr(v) for v in get_args(Drafting))
    if field == "dynamic_num_speculative_tokens":
        return "one of " + ", ".join(repr(v) for v in get_args(DynamicWindow))
    if field == "num_speculative_tokens":
        return f"an integer from {MIN_WINDOW} to {MAX_WINDOW}"
    if field == "row_lookahead":
        return f"an integer from 0 to {MAX_WINDOW}, at most the image's row of codes"
    if field == "proposer":
        return "a dotted class path"
    settings = sorted(set(SJDConfig.model_fields) | (VLLM_KEYS - {"method"}))
    return "not a setting; SJD accepts " + ", ".join(settings)


def _describe(err: ValidationError) -> str:
    problems = []
    for item in err.errors():
        field = ".".join(str(part) for part in item["loc"]) or "?"
        problems.append(
            f"speculative_config[{field!r}] = {item.get('input')!r} is invalid: "
            f"allowed: {_allowed_values(field)}"
        )
    return "Invalid SJD setting. " + "; ".join(problems)


def split_speculative_config(
    spec: dict[str, Any],
) -> tuple[dict[str, Any], SJDConfig]:
    """Split a user speculative config with method "sjd".

    Returns the dict vLLM's SpeculativeConfig accepts (method custom_class with
    our proposer) and the validated SJD settings.
    """
    assert spec.get("method") == SPECULATIVE_METHOD
    sjd_keys = {k: v for k, v in spec.items() if k not in VLLM_KEYS}
    if "num_speculative_tokens" in spec:
        sjd_keys["num_speculative_tokens"] = spec["num_speculative_tokens"]
    sjd = SJDConfig.parse(sjd_keys)
    if sjd.row_lookahead and spec.get("num_speculative_tokens_per_batch_size") is not None:
        raise SJDConfigError(
            "speculative_config['row_lookahead'] cannot be combined with "
            "'num_speculative_tokens_per_batch_size' (the table's K counts every draft "
            "vLLM schedules); drop one of them"
        )
    vllm_spec = {k: v for k, v in spec.items() if k in VLLM_KEYS}
    vllm_spec.update(
        method="custom_class",
        model=sjd.proposer,
        # The lookahead rides as drafts vLLM schedules and never sees accepted.
        num_speculative_tokens=sjd.num_speculative_tokens + sjd.row_lookahead,
    )
    return vllm_spec, sjd


# SJD2 -----------------------------------------------------------------------
SJD2_PROPOSER_CLASS = "vllm_sjd.sjd2.SJD2Proposer"
SJD2_VLLM_KEYS = frozenset({"method", "num_speculative_tokens", "max_model_len"})


class SJD2Config(BaseModel):
    """Validated SJD2 settings (`{"method": "sjd2", ...}`). Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # K: window slots, clean drafts (verified) and noisy ones (fed, never verified).
    num_speculative_tokens: int = DEFAULT_WINDOW
    # T: passes a token spends being denoised, the window's noisy tail (at most
    # K - 1 slots; levels rise along it to pure noise at the back, skipping
    # trained levels as DDIM does); the slots before it hold clean drafts.
    denoising_steps: int = 4
    # False: new slots start as clean drafts (from the newest row) instead of
    # noise, so nothing noisy is fed: SJD with Jacobi re-drafts on the same
    # checkpoint, the baseline SJD2 is measured against.
    denoising: bool = True
    # Proposer class (dotted path): SJD2's, or a subclass.
    proposer: str = SJD2_PROPOSER_CLASS

    @field_validator("num_speculative_tokens")
    @classmethod
    def _window_in_range(cls, value: int) -> int:
        return window_in_range(value)

    @field_validator("denoising_steps")
    @classmethod
    def _steps_in_range(cls, value: int) -> int:
        if not 1 <= value < MAX_WINDOW:
            raise ValueError(f"must be between 1 and {MAX_WINDOW - 1}")
        return value

    @classmethod
    def from_additional_config(cls, additional_config: Any) -> "SJD2Config":
        return cls(**((additional_config or {}).get(SJD2_SETTINGS_CONFIG_KEY) or {}))


def split_sjd2_config(spec: dict[str, Any]) -> tuple[dict[str, Any], SJDConfig, SJD2Config]:
    """Split a user speculative config with method "sjd2": vLLM's part, the SJD
    settings it runs on (independent re-drafts, a fixed window) and its own."""
    assert spec.get("method") == SJD2_METHOD
    try:
        sjd2 = SJD2Config(**{k: v for k, v in spec.items() if k not in SJD2_VLLM_KEYS - {"num_speculative_tokens"}})
    except ValidationError as err:
        problems = []
        for item in err.errors():
            field = ".".join(str(part) for part in item["loc"]) or "?"
            allowed = {
                "num_speculative_tokens": f"an integer from {MIN_WINDOW} to {MAX_WINDOW}",
                "denoising": "true or false",
                "proposer": "a dotted class path",
                "denoising_steps": f"an integer from 1 to {MAX_WINDOW - 1} (at most K - 1 are used)",
            }.get(field, "not a setting; SJD2 accepts " + ", ".join(
                sorted(set(SJD2Config.model_fields) | {"max_model_len"})))
            problems.append(
                f"speculative_config[{field!r}] = {item.get('input')!r} is invalid: allowed: {allowed}"
            )
        raise SJDConfigError("Invalid SJD2 setting. " + "; ".join(problems)) from None
    sjd = SJDConfig(num_speculative_tokens=sjd2.num_speculative_tokens, initial_drafts="uniform",
                    drafting="independent", dynamic_num_speculative_tokens="off",
                    proposer=sjd2.proposer)
    vllm_spec = {k: v for k, v in spec.items() if k in SJD2_VLLM_KEYS}
    vllm_spec.update(method="custom_class", model=sjd2.proposer,
                     num_speculative_tokens=sjd2.num_speculative_tokens)
    return vllm_spec, sjd, sjd2


# ZipAR ----------------------------------------------------------------------
ZIPAR_PROPOSER_CLASS = "vllm_sjd.zipar.ZipARProposer"
# The most tokens one request feeds in a pass is num_speculative_tokens + 1
# (vLLM's meaning: tokens a step runs beyond the first).
DEFAULT_ZIPAR_DRAFTS = 63
ZIPAR_VLLM_KEYS = frozenset({"method", "num_speculative_tokens", "max_model_len"})


class ZipARConfig(BaseModel):
    """Validated ZipAR settings (`{"method": "zipar", ...}`). Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # W: row r+1 starts once row r has W codes. None: a third of each image's
    # row, rounded up (ZipAR's own choices: 16 of Lumina-mGPT's 48 codes at
    # 768 px, 8 of LlamaGen's 24 at 384 px). W at least the row is plain AR.
    window: int | None = None
    # Cap on the tokens one request feeds in a pass, minus one (rows waiting
    # past it start later). Sized for a handful of active rows and more.
    num_speculative_tokens: int = DEFAULT_ZIPAR_DRAFTS

    @field_validator("window")
    @classmethod
    def _window_positive(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError("must be at least 1")
        return value

    @field_validator("num_speculative_tokens")
    @classmethod
    def _cap_positive(cls, value: int) -> int:
        if not 1 <= value <= 255:
            raise ValueError("must be between 1 and 255")
        return value

    def window_for(self, cols: int) -> int:
        """W for a grid of `cols` codes a row."""
        return min(cols, self.window if self.window is not None else -(-cols // 3))

    def order_for(self, grid):
        """The ZipAR stream order of an image of `grid` (core/zipar.py), cached per grid."""
        from vllm_sjd.core.zipar import stream_order

        return stream_order(grid, self.window_for(grid.cols), self.num_speculative_tokens + 1)

    @classmethod
    def from_additional_config(cls, additional_config: Any) -> "ZipARConfig":
        settings = (additional_config or {}).get(ZIPAR_SETTINGS_CONFIG_KEY)
        if settings is None:
            raise SJDConfigError(
                "ZipAR settings are missing from additional_config; start the engine with "
                'speculative_config={"method": "zipar", ...} and the vllm-sjd plugin installed'
            )
        return cls(**settings)


def split_zipar_config(spec: dict[str, Any]) -> tuple[dict[str, Any], ZipARConfig]:
    """Split a user speculative config with method "zipar" (see split_speculative_config)."""
    assert spec.get("method") == ZIPAR_METHOD
    settings = {k: v for k, v in spec.items() if k not in ZIPAR_VLLM_KEYS - {"num_speculative_tokens"}}
    try:
        zipar = ZipARConfig(**settings)
    except ValidationError as err:
        problems = []
        for item in err.errors():
            field = ".".join(str(part) for part in item["loc"]) or "?"
            allowed = {
                "window": "an integer of at least 1 (at most the image's row of codes)",
                "num_speculative_tokens": "an integer from 1 to 255",
            }.get(field, "not a setting; ZipAR accepts " + ", ".join(
                sorted(set(ZipARConfig.model_fields) | {"max_model_len"})))
            problems.append(
                f"speculative_config[{field!r}] = {item.get('input')!r} is invalid: allowed: {allowed}"
            )
        raise SJDConfigError("Invalid ZipAR setting. " + "; ".join(problems)) from None
    vllm_spec = {k: v for k, v in spec.items() if k in ZIPAR_VLLM_KEYS}
    vllm_spec.update(
        method="custom_class",
        model=ZIPAR_PROPOSER_CLASS,
        num_speculative_tokens=zipar.num_speculative_tokens,
    )
    return vllm_spec, zipar
