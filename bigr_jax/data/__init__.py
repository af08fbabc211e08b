"""grain input pipelines: image sources, the original's transforms, pre-extracted codes, loaders.

Typical use (a trainer):

  source = data.build_source(config.data)
  loader = data.make_loader(source, global_batch_size=config.batch_size, seed=config.seed,
                            transforms=data.build_transforms(config.data), worker_count=...)
  it = iter(loader)            # it.get_state() / it.set_state(state) for checkpoints
  batch = next(it)             # {"image": float32 (B, S, S, 3) in [0, 1], "label": int32 (B,)}
"""

from bigr_jax.data.builder import build_source
from bigr_jax.data.builder import build_transforms
from bigr_jax.data.builder import SOURCE_NAMES
from bigr_jax.data.codes import CodesSource
from bigr_jax.data.codes import CodesWriter
from bigr_jax.data.codes import encode_to_codes
from bigr_jax.data.codes import OriginalCodesSource
from bigr_jax.data.codes import SyntheticCodes
from bigr_jax.data.loader import make_loader
from bigr_jax.data.loader import per_host_batch_size
from bigr_jax.data.sources import BadImageError
from bigr_jax.data.sources import decode_image
from bigr_jax.data.sources import DigitsSource, MNISTSource
from bigr_jax.data.sources import ImageFolderSource
from bigr_jax.data.sources import TfdsImageSource
from bigr_jax.data.transforms import center_crop_arr
from bigr_jax.data.transforms import CenterCrop
from bigr_jax.data.transforms import codes_transforms
from bigr_jax.data.transforms import image_transforms
from bigr_jax.data.transforms import RandomFlip
from bigr_jax.data.transforms import RandomFlipCodes
from bigr_jax.data.transforms import ToFloat
