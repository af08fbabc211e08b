"""Weights by name: `hf://<owner>/<repo>/<path in the repo>[@revision]` wherever a setting takes weights.

The file is fetched once with `huggingface_hub` into its standard cache (`HF_HOME`, `HF_ENDPOINT` and
`HF_HUB_OFFLINE` apply) and then read as any local file is, with the converter's strict key check. The original's
released files (`RELEASED`) are paired with the config each needs: a config whose model differs is refused
before anything is downloaded, naming the config that fits.
"""

from typing import NamedTuple, Optional, Union

import huggingface_hub
from huggingface_hub import errors as hub_errors

from bigr_jax.weights import generator_weights, tokenizer_weights
from bigr_jax.models.config import MODEL_SIZES, GeneratorConfig, TokenizerConfig

PREFIX = "hf://"
ORIGINAL_REPO = "haoosz/BiGR"


class Released(NamedTuple):
  config: str  # the config file (with its arguments) that fits the file
  model: Union[GeneratorConfig, TokenizerConfig]  # its architecture (the package alone knows it, without configs/)


# The original's released files (its README's links), each with the config it needs.
RELEASED = {
    "gpt/bigr_L_d24.pt": Released("configs/bigr_l.py:bits=24", GeneratorConfig(binary_size=24, **MODEL_SIZES["L"])),
    "gpt/bigr_XL_d24.pt": Released("configs/bigr_xl.py:bits=24", GeneratorConfig(binary_size=24, **MODEL_SIZES["XL"])),
    "gpt/bigr_XXL_d24.pt": Released("configs/bigr_xxl.py:bits=24",
                                    GeneratorConfig(binary_size=24, **MODEL_SIZES["XXL"])),
    "gpt/bigr_XXL_d32.pt": Released("configs/bigr_xxl.py:bits=32",
                                    GeneratorConfig(binary_size=32, **MODEL_SIZES["XXL"])),
    "gpt/bigr_L_d32_512.pt": Released("configs/bigr_l_512.py:bits=32",
                                      GeneratorConfig(binary_size=32, **MODEL_SIZES["L-512"])),
    "bae/bae_d24/binaryae_ema_1000000.th": Released("configs/bae_d24.py", TokenizerConfig(codebook_size=24)),
    "bae/bae_d32/binaryae_ema_950000.th": Released("configs/bae_d32.py", TokenizerConfig(codebook_size=32)),
    "bae/bae_d32_512/binaryae_ema_720000.th": Released("configs/bae_d32_512.py",
                                                       TokenizerConfig(codebook_size=32, img_size=512)),
}


class HubFile(NamedTuple):
  repo: str
  path: str
  revision: Optional[str]


def parse(source) -> Optional[HubFile]:
  """The repo, path and revision of an `hf://` name; None for any other source (a local path)."""
  source = str(source)
  if not source.startswith(PREFIX):
    return None
  name, _, revision = source[len(PREFIX):].partition("@")
  parts = name.split("/")
  if len(parts) < 3 or not all(parts):
    raise ValueError(f"{source}: expected {PREFIX}<owner>/<repo>/<path of a file in the repo>[@revision]")
  return HubFile("/".join(parts[:2]), "/".join(parts[2:]), revision or None)


def _torch_shapes(model_config) -> dict:
  if isinstance(model_config, TokenizerConfig):
    return {row[0]: tuple(row[3]) for row in tokenizer_weights.tokenizer_specs(model_config)}
  return generator_weights.expected_torch_shapes(model_config)


def check_pairing(source, model_config) -> None:
  """Refuses a released file named with a config whose model (size, bits, resolution) is not the file's, naming
  the config it needs. Nothing is downloaded; other sources pass."""
  hub_file = parse(source)
  if hub_file is None or hub_file.repo != ORIGINAL_REPO or hub_file.path not in RELEASED:
    return
  released = RELEASED[hub_file.path]
  if type(released.model) is not type(model_config) or _torch_shapes(released.model) != _torch_shapes(model_config):
    raise ValueError(f"{source} holds the weights of --config={released.config}; this config's model is another "
                     f"(size, bits or resolution): use --config={released.config}")


def local_path(source, model_config: Union[GeneratorConfig, TokenizerConfig]) -> str:
  """The local path of a weights source: an `hf://` name is checked against `model_config`, then fetched into
  the hub cache once; any other source is returned as it is."""
  hub_file = parse(source)
  if hub_file is None:
    return str(source)
  check_pairing(source, model_config)
  try:
    return huggingface_hub.hf_hub_download(hub_file.repo, hub_file.path, revision=hub_file.revision)
  except hub_errors.LocalEntryNotFoundError as e:
    raise FileNotFoundError(
        f"{source} is not in the hub cache ({huggingface_hub.constants.HF_HUB_CACHE}) and the hub cannot be "
        f"reached (HF_HUB_OFFLINE or no network): on a machine with network, `hf download {hub_file.repo} "
        f"{hub_file.path}` with the same HF_HOME fills the cache") from e
  except (hub_errors.RepositoryNotFoundError, hub_errors.RevisionNotFoundError,
          hub_errors.EntryNotFoundError) as e:
    raise FileNotFoundError(f"{source} is not a file on the hub ({type(e).__name__})") from e
  except (hub_errors.HfHubHTTPError, OSError) as e:  # a download cut short fails the size check: an OSError
    cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise FileNotFoundError(f"{source} could not be downloaded: {cause}") from e
