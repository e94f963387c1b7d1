"""Plan a run before making it: predicted peak memory per stage, and a time estimate.

From a model's configuration alone (no weights read) and the run's flags, :func:`plan_run`
lists each stage of the job (loading, calibration capture, the dense scoring pass,
statistics per block, the solves and their cross-validation, surgery, evaluation, saving)
with the bytes it holds on the compute device and on the host, named term by term, says
which stage sets the peak, whether it fits the memory given, and which settings would make
it fit. The terms follow what the code allocates (see :mod:`grail.engine`,
:mod:`grail.stats`, :mod:`grail.compensate`); their constants were measured on CPU runs of
SmolLM2-135M and of synthetic LLaMA- and Qwen2-shaped models (``bench/bench_plan.py``,
README "Planning a run").

Bytes are what the run holds, including the Python runtime's own resident memory
(:data:`RUNTIME_BYTES`); activations spilled to memory-mapped files are counted apart
(page cache the system reclaims under pressure), not in the peak.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from grail.compensate import SKETCH_ROWS, KeptGramInPlace, block_elements
from grail.config import PruneConfig, RunConfig
from grail.errors import GrailError
from grail.policy import CompensationPolicy
from grail.stats import token_chunks

GIB = 2**30
F64 = 8
DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
# Resident memory of the Python process with torch, transformers and GRAIL imported and a
# tokenizer and the tokenised text loaded, before any weight (measured: 0.38 GiB after the imports
# and 0.58 GiB with WikiText-2 tokenised, on the CPU machines here); a
# CUDA process also holds the CUDA context and kernels on the host and on the device.
RUNTIME_BYTES = {"cpu": int(0.58 * GIB), "cuda": int(3.0 * GIB)}
CUDA_CONTEXT_BYTES = int(0.6 * GIB)
# A decoder layer's forward pass holds about this many [batch, seqlen, intermediate + hidden]
# tensors at once in its compute dtype (gate and up outputs, their product, the residual and
# normalised copies; attention runs fused, without a seqlen x seqlen matrix). Measured 3.6-4.4.
FORWARD_TENSORS = 4.0
# Reading a GGUF file holds its weights dequantised to float32 and more: measured 1.3 x the
# float32 model on SmolLM2-135M's Q4_1 file.
GGUF_LOAD_FLOAT32_COPIES = 1.3
# SlimGPT's selection per block: Cholesky and inverse of the Hessian (about 4/3 D^3) and the OBS
# downdates of the removed columns (about D^3 / 2 at 50%).
OBS_CUBES = 1.8
# Tokens of each evaluation split with a 32,000-token LLaMA vocabulary; larger vocabularies give
# fewer tokens, so these bound the windows a streamed evaluation holds (C4 has a fixed count).
EVALUATION_TOKENS = {"wikitext2": 341_000, "ptb": 82_000}
# ``--stats_device auto`` keeps the statistics on a GPU when the plan's peak there stays within this
# share of the memory the run has on it: the plan came within 15% of measured peaks on CPU runs, and
# the statistics' own terms are exact sizes, so a small margin covers the rest.
STATS_ON_DEVICE_SHARE = 0.95


@dataclass(frozen=True)
class ModelShape:
    """The widths of a LLaMA-family decoder, read from its configuration."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    file_dtype: str | None = None  # the dtype the checkpoint stores, when its config says
    qkv_bias: bool = False  # Qwen2's q/k/v biases

    @classmethod
    def from_config(cls, config) -> ModelShape:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            vocab=config.vocab_size,
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            file_dtype=_dtype_name(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)),
            qkv_bias=config.model_type == "qwen2" or bool(getattr(config, "attention_bias", False)),
        )

    @property
    def attention_width(self) -> int:
        return self.heads * self.head_dim

    def layer_params(self, keep: float = 1.0) -> int:
        """Parameters of one decoder layer with a share ``keep`` of its heads and channels."""
        d, a, kv, i = self.hidden, self.attention_width, self.kv_heads * self.head_dim, self.intermediate
        biases = (a + 2 * kv) if self.qkv_bias else 0
        return int(keep * (2 * d * a + 2 * d * kv + 3 * d * i + biases)) + 2 * d

    @property
    def rest_params(self) -> int:
        """Embeddings, output head (unless tied) and final norm."""
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2) + self.hidden

    def params(self, keep: float = 1.0) -> int:
        return self.layers * self.layer_params(keep) + self.rest_params


def _dtype_name(value) -> str | None:
    return None if value is None else str(value).removeprefix("torch.")


@dataclass(frozen=True)
class Setting:
    """What the plan needs to know about the run besides the model."""

    prune: PruneConfig
    seqlen: int
    dtype: str = "float32"
    device: str = "cpu"  # cpu or cuda
    mode: str = "memory"  # memory or streaming (--offload)
    spill: bool = False  # calibration activations in memory-mapped files
    processes: int = 1  # torchrun ranks (each holds the model; activations are shared out)
    eval_windows: int = 0  # 0: no evaluation
    eval_batch_size: int = 16
    save: bool = False
    source: str = "safetensors"  # or gguf (dequantised on load)
    device_memory: int | None = None  # bytes of the CUDA device, when known (where activations go)

    @property
    def weight_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]


@dataclass
class Stage:
    """One stage's bytes on the compute device and on the host, by named term."""

    name: str
    device: dict[str, int] = field(default_factory=dict)
    host: dict[str, int] = field(default_factory=dict)
    passing: set[str] = field(default_factory=set)  # terms that live only while the pass runs

    @property
    def device_bytes(self) -> int:
        return sum(self.device.values())

    @property
    def host_bytes(self) -> int:
        return sum(self.host.values())


def _method_traits(prune: PruneConfig) -> dict:
    from grail.methods import make_method

    method = make_method(prune)
    return {
        "activations": method.uses_activations,
        "scoring_pass": method.allocator.is_global and method.selector.uses_activations,
        "selection_gram": method.selector.needs_gram,
        "refits": method.selector.refits,
        "transforms": bool(method.transforms),
    }


def stages(shape: ModelShape, s: Setting) -> list[Stage]:
    """The stages of a run and what each holds (the terms of :func:`plan_run`)."""
    p, w = s.prune, s.weight_bytes
    traits = _method_traits(p)
    ranks = s.processes
    keep = 1.0 - p.pruning_ratio
    d, i_w, a_w = shape.hidden, shape.intermediate, shape.attention_width
    layer = shape.layer_params() * w
    rest = shape.rest_params * w
    model = shape.params() * w
    streaming = s.mode == "streaming"
    # A safetensors file of the run's dtype is mapped on the CPU, not copied (transformers in
    # memory, grail.streaming layer by layer): pages become resident as they are read. Pruning
    # never runs an untied output head, so it is not resident until evaluation reads it (the
    # input embedding is read at the calibration tokens' rows, which with the system's
    # read-ahead covers most of it: measured 175 of 192 MiB for 16k tokens).
    mapped = s.device == "cpu" and s.source == "safetensors" and shape.file_dtype == s.dtype
    embedding = shape.vocab * d * w
    unread = embedding if mapped and not shape.tied_embeddings else 0
    resident_model = (layer + rest if streaming else model) - unread
    # In memory the mapping stays while any tensor of the file lives, so the pages of pruned
    # layers stay resident beside their new, smaller tensors (clean file pages, which the system
    # can drop under pressure; counted because the resident set shows them).
    pruned_copies = shape.layers * shape.layer_params(keep) * w if mapped and not streaming else 0
    if streaming:
        evaluated = layer + rest - (embedding if mapped and not shape.tied_embeddings else 0)
    elif mapped:
        evaluated = resident_model + pruned_copies + embedding
    else:
        evaluated = shape.params(keep) * w

    needed = p.windows_needed(traits["activations"])
    per_rank = math.ceil(needed / ranks) if needed else 0
    activations = per_rank * s.seqlen * d * w
    dense_copy = math.ceil(p.target_nsamples / ranks) * s.seqlen * d * w
    on_disk = s.spill
    host_stats = p.stats_device == "host" and s.device == "cuda"
    compensate, auto = p.compensate, p.compensate and p.ridge_lambda == "auto"
    folds = p.cv_folds if auto else 1
    targets = len(CompensationPolicy.from_config(p).dense_targets)
    batch_tokens = min(p.calib_batch_size, max(per_rank, 1)) * s.seqlen

    def forward(tokens: int, width: int) -> int:
        return int(FORWARD_TENSORS * tokens * (width + d) * w)

    # Activations stay on a CUDA device only when they take under a quarter of its free memory
    # (grail.calibration's rule); else they live on the host and go to the device a batch at a time.
    on_host = False
    if s.device == "cuda" and s.device_memory is not None:
        on_host = activations >= 0.25 * (s.device_memory - resident_model - CUDA_CONTEXT_BYTES)

    def store(stage: Stage, n: int) -> Stage:
        """Add ``n`` bytes of activations where they live (a batch of them on the device otherwise)."""
        if on_disk or on_host:
            stage.device["a batch of activations"] = batch_tokens * d * w
            stage.passing.add("a batch of activations")
            if on_host:
                stage.host["calibration activations"] = n
        else:
            stage.device["calibration activations"] = n
        return stage

    out: list[Stage] = []
    load = Stage("loading")
    if streaming:
        load.device["embeddings, head and one layer"] = rest + layer
    elif not mapped:  # new tensors: cast from the file's dtype, dequantised from GGUF, or bound for a GPU
        load.device["weights"] = model
        on_cpu = model if s.device == "cpu" else 0  # the weights themselves, already counted
        if s.source == "gguf":
            load.host["GGUF file dequantised to float32"] = int(GGUF_LOAD_FLOAT32_COPIES * shape.params() * 4) - on_cpu
        else:  # the mapped file, and on a GPU run the weights read on the host before they move
            file_bytes = shape.params() * DTYPE_BYTES.get(shape.file_dtype, w)
            load.host["the file, mapped while it is read"] = file_bytes
            if s.device == "cuda" and file_bytes != model:
                load.host["weights cast on the host before they move"] = model
    out.append(load)
    if needed:
        capture = store(Stage("calibration capture", {"weights": resident_model}), activations)
        capture.device["embedding pass"] = 2 * batch_tokens * d * w
        out.append(capture)
        if traits["scoring_pass"]:
            scoring = store(Stage("scoring pass (dense model)", {"weights": resident_model}), 2 * activations)
            scoring.device["layer forward"] = forward(batch_tokens, i_w)
            scoring.device["selection statistics"] = 2 * shape.layers * (i_w + a_w) * 3 * F64
            out.append(scoring)

    for kind, width, out_dim in (("attention", a_w, d), ("MLP", i_w, d)):
        kept = max(1, round(keep * width))
        block = Stage(f"statistics, {kind} block", {"weights": resident_model})
        home = block.host if host_stats else block.device  # where the float64 matrices accumulate
        if pruned_copies:
            block.device["pruned layers' new tensors (dense pages still mapped)"] = pruned_copies
        if needed:
            store(block, activations + (dense_copy if targets else 0))
            # The pass stops at the consumer, whose hook copies its input by fold and converts a
            # chunk of its tokens at a time to the product's dtype (float64 on the CPU, float32 on
            # CUDA), and squares it for the sum of squares (grail.stats).
            # The block's own intermediates are freed by then but for that input and the residual.
            exact = F64 if s.device == "cpu" else 4
            chunk = token_chunks(batch_tokens, width)[0].stop
            hook = batch_tokens * width * (w + (w if folds > 1 else 0)) + 2 * chunk * width * exact
            hook += 2 * batch_tokens * d * w
            # A chunk's product is added into the Gram matrix in place, but for one of another dtype
            # (float32 products on CUDA) or device (--stats_device host): a block of rows at a time.
            product_block = block_elements(width, width) * exact if s.device == "cuda" else 0
            passing = {
                "layer forward, or the consumer's input and its copies (the larger)": max(
                    forward(batch_tokens, i_w if kind == "MLP" else a_w), hook
                ),
                "a block of a chunk's Gram product": product_block if compensate else 0,
            }
            block.device |= {k: v for k, v in passing.items() if v}
            block.passing |= set(passing)
        if compensate:
            home[f"Gram matrices ({folds} fold(s))"] = folds * width * width * F64
        if traits["selection_gram"] and (not compensate or p.gram_nsamples != p.nsamples):
            block.device["selection Gram matrix"] = width * width * F64
        if targets:
            block.device["dense copy of the layer"] = layer
            # A window's targets in float64 (grail.calibration.run_paired, grail.engine): the dense consumer's
            # output and the drift, the residual target or a blend's own output, the blended target (the
            # unblended residual is freed by then); a window is in one fold, so no rows are copied out.
            blended = p.grail_target_blend != 1.0
            copies = 2 + ("residual" in CompensationPolicy.from_config(p).dense_targets or blended) + blended
            block.device["dense-model targets of a window (float64)"] = copies * s.seqlen * out_dim * F64
            block.passing.add("dense-model targets of a window (float64)")
            if compensate or traits["refits"]:  # a retargeted mean bias keeps the targets' sums only
                home[f"target cross moments ({targets}, whole)"] = targets * out_dim * width * F64
                if folds > 1:  # each fold's on the cross-validation's output sketch (grail.stats.TargetStats)
                    scored = targets * folds * min(out_dim, SKETCH_ROWS) * width * F64
                    home[f"target cross moments ({targets} x {folds} folds, sketched)"] = scored
        if traits["transforms"]:  # a float32 layer with gradients and the optimiser's two moments
            block.device["regional optimisation (float32 layer, gradients, moments)"] = 4 * shape.layer_params() * 4
        out.append(block)
        selection = _after(block, f"selection, {kind} block")  # the block's statistics are held until surgery
        if traits["selection_gram"]:  # SlimGPT's OBS (grail.methods.slimgpt), in float64
            selection.device["Hessian, its factor, inverse, identity and the OBS downdates"] = 6 * width * width * F64
            selection.device["consumer weights in float64"] = out_dim * width * F64
        out.append(selection)
        held_for_refit = {}  # the damped Hessian stays with SlimGPT's decision, for its own refit
        if traits["selection_gram"]:
            held_for_refit["SlimGPT's damped Hessian, kept for its refit"] = width * width * F64
        if compensate:
            prior_bytes = w if p.prior == "pruned" else 0
            in_place = not host_stats and KeptGramInPlace.has_room(width * width, kept, kept + 1)
            out += _solve_stages(
                kind, width, kept, out_dim, folds, targets, auto, block, held_for_refit, prior_bytes, in_place
            )
        elif traits["refits"]:  # SlimGPT's own least-squares refit of the kept columns, on its damped Hessian
            refit = _after(block, f"refit, {kind} block")
            refit.device |= held_for_refit | _system_terms(width, kept, out_dim, in_place=False)
            out.append(refit)
        surgery = _after(block, f"surgery, {kind} block")
        surgery.device |= held_for_refit
        surgery.device["the block's new, smaller projections"] = int(keep * shape.layer_params() * w / 2)
        out.append(surgery)
    if s.eval_windows:
        evaluation = Stage("evaluation", {"weights": evaluated})
        tokens = (s.eval_batch_size if not streaming else math.ceil(s.eval_windows / ranks)) * s.seqlen
        evaluation.device["activations of the windows in flight"] = tokens * d * w
        evaluation.device["layer forward"] = forward(min(tokens, s.eval_batch_size * s.seqlen), int(keep * i_w))
        evaluation.device["logits of one window (float32)"] = 2 * s.seqlen * shape.vocab * 4
        out.append(evaluation)
    if s.save and not streaming:
        # safetensors serialises a shard's tensors to bytes before writing (transformers' shards are <= 5 GB)
        shard = min(shape.params(keep) * w, 5 * 10**9)
        saving = Stage("saving", {"weights": evaluated})
        saving.host["a shard serialised"] = shard
        out.append(saving)
    runtime = RUNTIME_BYTES[s.device]
    for stage in out:
        if streaming and s.device == "cuda" and stage.device.get("weights"):
            stage.host["the layer's shard, mapped while it is copied over"] = layer
        stage.host["Python runtime"] = runtime
        if s.device == "cuda":
            stage.device["CUDA context"] = CUDA_CONTEXT_BYTES
        else:  # the compute device is the host
            stage.host |= stage.device
            stage.device = {}
    return out


def _after(block: Stage, name: str) -> Stage:
    """A stage that follows a block's statistics pass: what the block accumulated is still held."""
    held = lambda terms: {k: v for k, v in terms.items() if k not in block.passing}  # noqa: E731
    return Stage(name, held(block.device), held(block.host))


def _solve_stages(kind, width, kept, out_dim, folds, targets, auto, block, extra, prior_bytes, in_place) -> list[Stage]:
    """The consumer's cross-validation (``--ridge_lambda auto``) and final solve, with the block's statistics
    (and ``extra`` device terms) held. ``prior_bytes``: bytes per element of the kept weights the penalty
    pulls towards (0 for the zero prior); ``in_place``: the final system is made in the Gram matrix's memory."""
    k1, out = kept + 1, []
    if auto:
        scored = min(out_dim, SKETCH_ROWS)  # cross-validation scores the consumer on a sketch of its outputs
        cv = _after(block, f"cross-validation, {kind} block")
        cv.device |= extra
        cv.device["sketched consumer weights, W G of a fold and their product"] = 3 * scored * width * F64
        cv.device["the folds' total G[P, P] and one fold's"] = 2 * kept * kept * F64
        cv.device["training system, overwritten by its factor"] = k1 * k1 * F64
        cv.device["the folds' sketched products and a fold's fits (every target)"] = (
            (2 * folds + 2) * (1 + targets) * scored * k1 * F64
        )
        out.append(cv)
    solve = _after(block, f"solve, {kind} block")
    if auto:  # cross-validation is done: the folds were added into the first, in place (grail.stats)
        for terms in (solve.device, solve.host):
            for name in [n for n in terms if n.startswith("Gram matrices")]:
                terms[name.replace(f"{folds} fold(s)", "folds merged")] = terms.pop(name) // folds
            for name in [n for n in terms if n.startswith("target cross moments") and n.endswith("sketched)")]:
                del terms[name]  # dropped once cross-validation is done
    solve.device |= extra | _system_terms(width, kept, out_dim, in_place)
    if prior_bytes:
        solve.device["kept weights (the penalty's prior)"] = out_dim * kept * prior_bytes
    out.append(solve)
    return out


def _system_terms(width: int, kept: int, out_dim: int, in_place: bool) -> dict[str, int]:
    """What one least-squares solve of a consumer's kept columns holds (:func:`grail.compensate.fit_consumer`).

    ``in_place``: the system is made in the Gram matrix's memory and needs none of its own.
    """
    k1 = kept + 1
    # W's rows and G's columns in float64 blocks (G's brought over from the host with --stats_device host),
    # and their product
    columns = block_elements(kept, width)
    terms = {"right-hand side, overwritten by the solution": out_dim * k1 * F64}
    if not in_place:
        terms["system, overwritten by its factor"] = k1 * k1 * F64
    terms["blocks of W and G in float64"] = (
        block_elements(out_dim, width) + columns + out_dim * (columns // width)
    ) * F64
    return terms


@dataclass
class Plan:
    """Predicted peaks, the stage that sets them, and whether the run fits."""

    model_shape: ModelShape
    mode: str
    peak_host_bytes: int
    peak_device_bytes: int
    limiting_stage: str
    fits: bool | None
    stages: list[dict]
    spilled_bytes: int = 0
    suggestions: list[str] = field(default_factory=list)
    time: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    stats_device: str = "device"  # where the statistics accumulate (--stats_device auto made definite)

    def as_dict(self) -> dict:
        out = asdict(self)
        out["model_shape"] = asdict(self.model_shape)
        return out


def _peaks(stage_list: list[Stage]) -> tuple[int, int, str]:
    host = max(s.host_bytes for s in stage_list)
    device = max(s.device_bytes for s in stage_list)
    key = (lambda s: s.device_bytes) if device else (lambda s: s.host_bytes)
    return host, device, max(stage_list, key=key).name


def _fits(host: int, device: int, s: Setting, device_memory: float | None, host_memory: float | None) -> bool | None:
    checks = []
    if host_memory is not None:
        checks.append(host <= host_memory * GIB)
    if device_memory is not None and s.device == "cuda":
        checks.append(device <= device_memory * GIB)
    return all(checks) if checks else None


def time_estimate(shape: ModelShape, s: Setting) -> dict:
    """Calibration passes and solve work as multiples of one plain forward pass over the calibration windows.

    A rough cost model (the benchmarks' ratio): layer passes count as the share of a
    layer's multiply-adds they compute; the Gram products as ``D^2`` per token and consumer
    (float64 matrix products run at about the rate of the float32 forward pass on the CPUs
    measured); a consumer's solves as ``K^3 / 3`` per factorisation plus ``K^2 O`` per solve,
    counted twice (factorisations run at about half that rate).
    """
    p = s.prune
    traits = _method_traits(p)
    keep = 1.0 - p.pruning_ratio
    tokens = p.windows_needed(traits["activations"]) * s.seqlen
    if not tokens:
        return {"forward_passes": 0.0, "gram_passes": 0.0, "solve_passes": 0.0, "total_passes": 0.0}
    d, i_w, a_w = shape.hidden, shape.intermediate, shape.attention_width
    attn_macs = 2 * d * a_w + 2 * d * shape.kv_heads * shape.head_dim
    mlp_macs = 3 * d * i_w
    layer_macs = attn_macs + mlp_macs
    per_layer = (attn_macs - d * a_w) / layer_macs + (attn_macs + 2 * d * i_w) / layer_macs + 1.0
    targets = len(CompensationPolicy.from_config(p).dense_targets)
    if targets:  # the dense layer's pass beside the pruned one
        per_layer += 1.0
    passes = per_layer * shape.layers + (shape.layers if traits["scoring_pass"] else 0)
    gram_macs = solve_macs = 0.0  # per layer
    if p.compensate or traits["selection_gram"]:  # every token's Gram product, at each consumer
        gram_tokens = (p.gram_nsamples if p.compensate else p.nsamples) * s.seqlen
        gram_macs = gram_tokens * (a_w**2 + i_w**2)
    if p.compensate or traits["refits"]:  # each dense-model target's cross moment, O x D per token
        scored_rows = (
            min(d, SKETCH_ROWS) if p.compensate and p.ridge_lambda == "auto" else 0
        )  # and its fold's, on the sketch
        gram_macs += p.target_nsamples * s.seqlen * targets * (d + scored_rows) * (a_w + i_w)
    if p.compensate:
        factorisations = 1
        if p.ridge_lambda == "auto":
            factorisations += p.cv_folds * (4 if p.lambda_search == "local" else 9)
        for width in (a_w, i_w):
            k = keep * width
            solve_macs += factorisations * (k**3 / 3 + k * k * d) * 2
    elif traits["refits"]:  # SlimGPT's own refit of the kept columns: one factorisation and solve
        solve_macs += sum((keep * width) ** 3 / 3 + (keep * width) ** 2 * d for width in (a_w, i_w)) * 2
    if traits["selection_gram"]:  # SlimGPT's OBS: the Hessian's inverse and the downdates of every removal
        solve_macs += sum(OBS_CUBES * width**3 * 2 for width in (a_w, i_w))
    layer_pass = layer_macs * tokens
    forward, gram, solve = passes / shape.layers, gram_macs / layer_pass, solve_macs / layer_pass
    return {
        "forward_passes": round(forward, 2),
        "gram_passes": round(gram, 2),
        "solve_passes": round(solve, 2),
        "total_passes": round(forward + gram + solve, 2),
    }


def plan_run(
    shape: ModelShape,
    setting: Setting,
    device_memory: float | None = None,
    host_memory: float | None = None,
    suggest: bool = True,
) -> Plan:
    """The predicted peaks of a run; with memory limits (GiB), whether it fits and what would make it fit."""
    if device_memory is not None and setting.device_memory is None:
        setting = replace(setting, device_memory=int(device_memory * GIB))
    notes, asked = [], setting
    if setting.prune.stats_device == "auto":
        chosen, why = choose_stats_device(shape, setting)
        setting = replace(setting, prune=replace(setting.prune, stats_device=chosen))
        if setting.device == "cuda" and setting.prune.compensate:
            notes.append(f"--stats_device auto chooses {chosen}: {why}")
    stage_list = stages(shape, setting)
    host, device, limiting = _peaks(stage_list)
    fits = _fits(host, device, setting, device_memory, host_memory)
    spilled = 0
    if setting.spill:
        needed = setting.prune.windows_needed(_method_traits(setting.prune)["activations"])
        spilled = math.ceil(needed / setting.processes) * setting.seqlen * shape.hidden * setting.weight_bytes
    plan = Plan(
        shape,
        setting.mode,
        host * (setting.processes if setting.device == "cpu" else 1),
        device,
        limiting,
        fits,
        [
            {"stage": s.name, "device_bytes": s.device_bytes, "host_bytes": s.host_bytes, "device": s.device}
            | {"host": s.host}
            for s in stage_list
        ],
        spilled,
        time=time_estimate(shape, setting),
        notes=notes,
        stats_device=setting.prune.stats_device,
    )
    if setting.processes > 1 and setting.device == "cpu":
        plan.notes.append(
            f"peak_host_bytes sums the {setting.processes} processes; each stage's figures are per process"
        )
    if fits is False and suggest:
        plan.suggestions = _suggestions(shape, asked, device_memory, host_memory)  # auto stays a choice in each
    return plan


def choose_stats_device(shape: ModelShape, setting: Setting) -> tuple[str, str]:
    """``--stats_device auto`` made definite for a run, and why: ``host`` when, with the statistics on the GPU,
    the plan's peak there is above :data:`STATS_ON_DEVICE_SHARE` of ``setting.device_memory`` and the host
    lowers it (a peak the statistics do not set, such as loading, stays where it is and costs no time);
    else ``device``."""
    p = setting.prune
    if setting.device != "cuda" or not p.compensate:
        return "device", "the statistics are on the host either way" if setting.device != "cuda" else "no solves"
    if setting.device_memory is None:
        return "device", "the device's memory is not known (give --device_memory)"
    peak = {
        where: _peaks(stages(shape, replace(setting, prune=replace(p, stats_device=where))))[1]
        for where in ("device", "host")
    }
    share = f"{peak['device'] / GIB:.1f} GiB of the device's {setting.device_memory / GIB:.1f} GiB"
    if peak["device"] <= STATS_ON_DEVICE_SHARE * setting.device_memory:
        return "device", f"the plan with them there needs {share}"
    if peak["host"] >= peak["device"]:
        return "device", f"the plan needs {share} wherever they are"
    return "host", f"the plan with them on the device would need {share}, on the host {peak['host'] / GIB:.1f} GiB"


def device_memory_of_run(device, model_bytes: int) -> int:
    """Bytes of a CUDA device that a run already under way has to plan with: what is free, what PyTorch's cache
    holds unused, the model's own tensors there (the plan counts them) and the CUDA context; at most the whole
    device. Other tensors of the process are not counted: the run cannot use their memory."""
    import torch

    free, total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return min(total, free + cached + model_bytes + CUDA_CONTEXT_BYTES)


def _alternatives(s: Setting) -> list[tuple[str, Setting]]:
    """Settings that need less memory, each with the flags that choose it (gentlest first)."""
    p = s.prune
    out = []
    if p.calib_batch_size > 1:
        out.append(("--calib_batch_size 1", replace(s, prune=replace(p, calib_batch_size=1))))
    if p.compensate and p.stats_device == "device" and s.device == "cuda":  # auto takes the host itself
        out.append(("--stats_device host", replace(s, prune=replace(p, stats_device="host"))))
    if not s.spill:
        out.append(("--offload_activations DIR", replace(s, spill=True)))
    if s.mode == "memory":
        out.append(("--offload (layer streaming; needs --save_model)", replace(s, mode="streaming")))
    if p.compensate and p.ridge_lambda == "auto":
        if p.cv_folds > 2:
            out.append(("--cv_folds 2", replace(s, prune=replace(p, cv_folds=2))))
        out.append(("a fixed --ridge_lambda (e.g. 0.001)", replace(s, prune=replace(p, ridge_lambda=0.001))))
    if p.compensate and p.grail_target != "pruned":
        out.append(("--grail_target pruned", replace(s, prune=replace(p, grail_target="pruned"))))
    return out


def _suggestions(shape: ModelShape, s: Setting, device_memory, host_memory) -> list[str]:
    """The flags (alone, then accumulated in order) that make the run fit, each with its predicted peaks."""
    flags, current = [], s
    found = [
        f"{flag}: {_describe(plan)}"
        for flag, plan in _alternative_plans(shape, s, device_memory, host_memory)
        if plan.fits
    ]
    if found:
        return found
    for flag, _ in _alternatives(s):  # none alone: combine them in order
        current = dict(_alternatives(current)).get(flag, current)
        flags.append(flag)
        combined = plan_run(shape, current, device_memory, host_memory, suggest=False)
        if combined.fits:
            return [f"{' + '.join(flags)}: {_describe(combined)}"]
    return ["nothing GRAIL can change fits this memory: use a machine with more memory, or fewer --nsamples"]


def _alternative_plans(shape: ModelShape, s: Setting, device_memory, host_memory) -> list[tuple[str, Plan]]:
    """Each setting of :func:`_alternatives` alone, with its plan."""
    return [
        (flag, plan_run(shape, alternative, device_memory, host_memory, suggest=False))
        for flag, alternative in _alternatives(s)
    ]


def _describe(plan: Plan) -> str:
    text = f"host {plan.peak_host_bytes / GIB:.1f} GiB"
    if plan.peak_device_bytes:
        text += f", device {plan.peak_device_bytes / GIB:.1f} GiB"
    return text


def setting_from_config(config: RunConfig, processes: int = 1, device: str | None = None) -> Setting:
    """The :class:`Setting` of a run described by ``config`` (``processes``: torchrun ranks)."""
    from grail.models.loading import resolve_model
    from grail.pipeline import default_device

    device = device or config.device or default_device()  # the device the run itself would take
    if device == "auto":
        raise GrailError("grail plan predicts one device; give --device cpu or --device cuda.")
    eval_windows = 0
    if config.eval_datasets:  # streamed evaluation holds every window of a dataset at once
        whole = max(_evaluation_windows(name, config.seqlen) for name in config.eval_datasets)
        eval_windows = min(config.eval_samples or whole, whole)
    _, gguf = resolve_model(config.model) if not config.offload else (None, None)
    return Setting(
        prune=config.prune,
        seqlen=config.seqlen,
        dtype=config.dtype,
        device="cuda" if device.startswith("cuda") else "cpu",
        mode="streaming" if config.offload else "memory",
        spill=config.prune.offload_activations is not None,
        processes=processes,
        eval_windows=eval_windows,
        eval_batch_size=config.eval_batch_size,
        save=config.save_model is not None and not config.offload,
        source="gguf" if gguf else "safetensors",
    )


def out_of_memory_advice(
    config: RunConfig,
    device: str,
    on_device: bool,
    device_memory: float | None,
    host_memory: float | None,
    processes: int = 1,
) -> str:
    """What to tell a user whose run on ``device`` ran out of memory (``on_device``: the CUDA device's, else the
    host's): the plan's peak there and the settings that need less (memory in GiB)."""
    setting = setting_from_config(config, processes, device=device)
    shape = model_shape(config.model)
    plan = plan_run(shape, setting, device_memory, host_memory)
    where = "device" if on_device else "host"
    peak = plan.peak_device_bytes if on_device else plan.peak_host_bytes
    text = f"the plan of these flags (grail plan) predicts {peak / GIB:.1f} GiB on the {where}, set by {plan.limiting_stage}"
    options = plan.suggestions or [
        f"{flag}: {_describe(other)}" for flag, other in _alternative_plans(shape, setting, device_memory, host_memory)
    ]
    return f"{text}; settings that need less: {'; '.join(options)}" if options else text


def _evaluation_windows(dataset: str, seqlen: int) -> int:
    from grail.data import C4_EVAL_WINDOWS

    return C4_EVAL_WINDOWS if dataset == "c4" else math.ceil(EVALUATION_TOKENS[dataset] / seqlen)


def plan_config(
    config: RunConfig, device_memory: float | None = None, host_memory: float | None = None, processes: int = 1
) -> Plan:
    """The plan of the run ``config`` describes (memory in GiB), read from the model's configuration only."""
    from grail.engine import check_target
    from grail.methods import make_method

    check_target(config.prune, make_method(config.prune))  # a run the main command would refuse has no plan
    return plan_run(model_shape(config.model), setting_from_config(config, processes), device_memory, host_memory)


def model_shape(name: str) -> ModelShape:
    """The shape of a model from its configuration only (a hub id's config.json, a folder, a .gguf file)."""
    from transformers import AutoConfig

    from grail.models.arch import arch_for
    from grail.models.loading import resolve_model

    location, gguf = resolve_model(name)
    try:
        config = AutoConfig.from_pretrained(location, **({"gguf_file": gguf} if gguf else {}))
    except OSError as err:
        raise GrailError(f"could not read the configuration of {name!r}: {err}") from None
    arch_for(config)
    return ModelShape.from_config(config)


def format_plan(plan: Plan) -> str:
    """The plan as a table of stages, then the verdict and suggestions."""
    rows = [f"{'stage':44s} {'device GiB':>10s} {'host GiB':>9s}"]
    for s in plan.stages:
        rows.append(f"{s['stage']:44s} {s['device_bytes'] / GIB:10.2f} {s['host_bytes'] / GIB:9.2f}")
    rows.append(
        f"peak: host {plan.peak_host_bytes / GIB:.2f} GiB, device {plan.peak_device_bytes / GIB:.2f} GiB "
        f"(set by: {plan.limiting_stage}); mode {plan.mode}"
    )
    if plan.spilled_bytes:
        rows.append(f"spilled activations: {plan.spilled_bytes / GIB:.2f} GiB in memory-mapped files (page cache)")
    t = plan.time
    if t:
        rows.append(
            f"time: about {t['total_passes']:g} plain forward passes over the calibration windows "
            f"({t['forward_passes']:g} in layer passes, {t['gram_passes']:g} in Gram products, "
            f"{t['solve_passes']:g} in solves)"
        )
    if plan.fits is not None:
        rows.append("fits the memory given" if plan.fits else "does NOT fit the memory given")
    rows += [f"  to fit: {s}" for s in plan.suggestions]
    rows += [f"  note: {n}" for n in plan.notes]
    return "\n".join(rows)
