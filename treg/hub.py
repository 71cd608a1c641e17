"""Where a model comes from and what it runs on: a local folder, the local Hugging Face cache, or the hub. `locate`
decides before anything loads, so that a missing model is one line: no retry messages and no 40 s wait when the hub
is out of reach, and a path that does not exist is reported as a path, not looked up as a hub id. `resolve_device`
and `weight_dtype` turn the CLIs' --device and --dtype into torch values, or a one-line error."""
import os
from pathlib import Path

import torch

from treg.config import ConfigError


def quiet_libraries():
    """For a CLI that owns stderr: warnings as one line each, and no info logs or progress bars from diffusers and
    transformers."""
    import warnings
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging
    warnings.formatwarning = lambda message, *rest, **kw: f"warning: {message}\n"
    for lib in (diffusers_logging, transformers_logging):
        lib.set_verbosity_error()
        lib.disable_progress_bar()


class ModelUnavailable(RuntimeError):
    """A model cannot be had; the message is one line saying what is missing and what to do."""


def offline():
    from huggingface_hub import constants
    # the hub reads HF_HUB_OFFLINE at import time; re-read it so that setting it later is honoured too
    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def looks_like_path(source):
    """Hub ids are `name` or `owner/name`; anything else that names a location is meant as a folder."""
    return source.startswith(("/", ".", "~")) or source.count("/") > 1 or "\\" in source or source.endswith("/")


def locate(source, what, flag, probe="config.json"):
    """(source, local_files_only) for `from_pretrained`, or ModelUnavailable as one line.

    `what` names the model in messages, `flag` the CLI option that points at it, `probe` a file every copy holds
    (for Stable Diffusion 'unet/config.json'). A cached hub model loads with local_files_only, so a run never waits
    on the network for a model it already has."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelUnavailable(f"the {what} '{source}' is a file; {flag} takes a model folder or a hub id")
        return str(path), True
    if not source.strip() or looks_like_path(source):
        raise ModelUnavailable(f"the {what} folder '{source}' does not exist; "
                               f"give {flag} an existing folder or a hub id")
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError
    try:
        cached = try_to_load_from_cache(source, probe)
    except HFValidationError:
        raise ModelUnavailable(f"the {what} '{source}' is neither an existing folder nor a valid hub id") from None
    if isinstance(cached, str):
        return source, True
    advice = (f"download it once with `hf download {source}` where the hub is reachable, "
              f"or point {flag} at a local folder")
    if offline():
        raise ModelUnavailable(f"the {what} '{source}' is not in the local Hugging Face cache and HF_HUB_OFFLINE is "
                               f"set; {advice}")
    try:
        HfApi().model_info(source, timeout=10)
    except RepositoryNotFoundError:
        raise ModelUnavailable(f"there is no {what} '{source}' on the Hugging Face hub (or it is private: run "
                               f"`hf auth login`); check the id, or point {flag} at a local folder") from None
    except Exception as err:  # connection refused, DNS, timeout, proxy: the hub's client raises many kinds
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:120]
        raise ModelUnavailable(f"the {what} '{source}' is not in the local Hugging Face cache and the hub cannot be "
                               f"reached ({reason}); {advice}") from None
    return source, False


def load(cls, source, local_only, what, weights=True, **kwargs):
    """cls.from_pretrained(source, ...); for a model with `weights`, every weight must load: a missing, unexpected
    or mis-shaped one is an error, not the warning that diffusers and transformers print before running with random
    values (a tokenizer or scheduler has none)."""
    import warnings
    try:
        with warnings.catch_warnings():
            # diffusers passes huggingface_hub an argument it has deprecated; the warning is noise to our users
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
            loaded = cls.from_pretrained(source, local_files_only=local_only, **kwargs,
                                         **({"output_loading_info": True} if weights else {}))
    except (OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ModelUnavailable(f"cannot load the {what} from '{source}': {first}") from None
    if not weights:
        return loaded
    model, info = loaded
    problems = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {k: v for k, v in problems.items() if v}
    if problems or info.get("error_msgs"):
        kind, keys = next(iter(problems.items())) if problems else ("errors", info["error_msgs"])
        raise ModelUnavailable(f"the {what} in '{source}' does not match its weights: {len(keys)} "
                               f"{kind.replace('_', ' ')} (e.g. {str(keys[0])[:80]}); the checkpoint is incomplete "
                               f"or was saved by an incompatible library version")
    return model


def resolve_device(name, state=None):
    """The torch device for --device (None: this process's accelerator under `accelerate launch`, else this
    machine's usable accelerator, else cpu), or ConfigError if this machine has no such device. `state`:
    accelerate's PartialState, or None outside a launch."""
    if name is None:
        launched = state is not None and state.num_processes > 1
        # check_available: a CUDA build of torch names cuda even where no GPU or driver is (a login node)
        usable = torch.accelerator.current_accelerator(check_available=True)
        return torch.device((state.device if launched else None) or usable or "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {name!r} is not a torch device (cpu, cuda, cuda:1, mps, xpu, ...)") from None
    if device.type == "cpu":
        return device
    if device.type == "meta":
        raise ConfigError("--device meta holds no data; use cpu or an accelerator")
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if accelerator is None or accelerator.type != device.type:
        have = f"cpu and {accelerator.type}" if accelerator else "only cpu"
        raise ConfigError(f"--device {name}: this machine has no {device.type} device (it has {have})")
    if device.index is not None and device.index >= torch.accelerator.device_count():
        raise ConfigError(f"--device {name}: there are {torch.accelerator.device_count()} {device.type} devices")
    return device


def weight_dtype(name, device):
    """The torch dtype for --dtype fp16, bf16 or fp32; None = fp16 on an accelerator, fp32 on cpu."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
            None: torch.float16 if device.type != "cpu" else torch.float32}[name]
