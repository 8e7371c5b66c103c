"""High-level generation: source images with their poses and any number of target poses -> images.

Weights come from a converted folder (`imagpose-convert pipeline ...`):
  denoiser/      config.json + params.safetensors   (UNet + CVA, pose guider, patch embedding)
  vae/           config.json (diffusers) + params.safetensors
  image_encoder/ config.json (transformers) + params.safetensors
No PyTorch is needed to load or run it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from imagpose_jax.data.grid import Layout, check_view_size, compose, plan_layouts, untile
from imagpose_jax.data.pose import render_pose
from imagpose_jax.data.batch import Batch, make_example, stack
from imagpose_jax.images import contact_sheet
from imagpose_jax.preprocess import as_rgb_image, load_image, vae_preprocess
from imagpose_jax.sampling.sampler import Sampler, SamplerConfig


def load_pipeline_models(folder: str | os.PathLike, dtype=None):
    """(IMAGPose model, VAE, DINOv2) from a converted pipeline folder, built in `dtype` ("float32", "bfloat16",
    "float16" or the dtype; None: float32), weights and compute: each tensor is cast to it as it is read, so no
    float32 copy is ever held (`checkpoint.params.load_module`; what stays float32 inside: `models.layers`)."""
    from imagpose_jax.checkpoint.folder import PipelineFolder
    from imagpose_jax.checkpoint.params import load_model, load_module
    from imagpose_jax.models.dinov2 import Dinov2Config, Dinov2Model
    from imagpose_jax.models.layers import parse_dtype
    from imagpose_jax.models.vae import AutoencoderKL, VAEConfig

    dtype = parse_dtype(dtype)
    folder = PipelineFolder(folder).check()
    model, _ = load_model(folder.denoiser, dtype=dtype)
    vae = load_module(folder.vae, lambda c, k: AutoencoderKL(VAEConfig.from_dict(c), rngs=k, dtype=dtype))
    dino = load_module(folder.image_encoder, lambda c, k: Dinov2Model(Dinov2Config.from_dict(c), rngs=k, dtype=dtype))
    return model, vae, dino


def pose_view(pose, height: int, width: int, *, frame: tuple[int, int] | None = None) -> np.ndarray:
    """A pose -> its rendering on a height x width view, (H, W, 3) float32 in [0, 1].

    `pose`: a rendered pose image (path, PIL image or uint8 array; resized to the view), an OpenPose JSON path or
    (18, 2) keypoints. Keypoints are placed by `data.pose.keypoints_to_view`: a JSON's own canvas size, else
    `frame` (W, H) (the source photo the pose belongs to), else normalised or view pixels."""
    from imagpose_jax.data.pose import keypoints_to_view, load_openpose_json, openpose_canvas
    source = "keypoints"
    if isinstance(pose, (str, os.PathLike)) and os.fspath(pose).lower().endswith(".json"):
        source = os.fspath(pose)
        frame = openpose_canvas(pose) or frame
        pose = load_openpose_json(pose)
    if isinstance(pose, np.ndarray) and pose.ndim == 2:
        kp = keypoints_to_view(pose, height, width, frame=frame, source=source)
        return render_pose(kp, height, width).astype(np.float32) / 255.0
    image = load_image(pose) if isinstance(pose, (str, os.PathLike)) else as_rgb_image(pose)
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    return np.asarray(image, np.float32) / 255.0


@dataclass
class Generation:
    targets: list[np.ndarray]      # one (H, W, 3) float32 in [0, 1] per target pose, in order
    grids: np.ndarray              # (G, 2H, 2W, 3) every decoded grid
    layouts: list[Layout]
    sources: list[np.ndarray]      # the source views (H, W, 3) in [0, 1], as the model saw them
    target_poses: list[np.ndarray]  # the target poses' renderings (H, W, 3) in [0, 1]

    def sheet(self) -> np.ndarray:
        """uint8 contact sheet, one row per target: sources | target pose | result."""
        return contact_sheet([list(self.sources) + [p, r] for p, r in zip(self.target_poses, self.targets)])


class IMAGPosePipeline:
    def __init__(self, model, vae, dino, cfg: SamplerConfig = SamplerConfig()):
        self.cfg = cfg
        self.sampler = Sampler(model, vae, dino, cfg)

    @classmethod
    def from_pretrained(cls, folder, cfg: SamplerConfig = SamplerConfig(), dtype=None) -> IMAGPosePipeline:
        """The pipeline of a converted folder, its models in `dtype` (see `load_pipeline_models`)."""
        return cls(*load_pipeline_models(folder, dtype), cfg)

    def set_weights(self, model, vae, dino) -> None:
        """Swaps in other weights of the same model configs; the compiled program is reused (`Sampler.set_weights`)."""
        self.sampler.set_weights(model, vae, dino)

    def prepare(self, sources, source_poses, target_poses, view_size: tuple[int, int]) -> tuple[Batch, list[Layout]]:
        """Host-side inputs: a batch of grids (one per layout) and the layouts."""
        batch, layouts, _, _ = self._prepare(sources, source_poses, target_poses, view_size)
        return batch, layouts

    def _prepare(self, sources, source_poses, target_poses, view_size):
        sources, source_poses, target_poses = (_as_list(x) for x in (sources, source_poses, target_poses))
        h, w = view_size
        check_view_size(h, w, self.sampler.view_multiple)
        if len(sources) != len(source_poses):
            raise ValueError(f"{len(sources)} source image(s) but {len(source_poses)} source pose(s): give one pose per source")
        layouts = plan_layouts(len(sources), len(target_poses))
        src_images = [load_image(s) if isinstance(s, (str, os.PathLike)) else as_rgb_image(s) for s in sources]
        src = [vae_preprocess(im, (h, w)) for im in src_images]
        src_p = [pose_view(p, h, w, frame=im.size) for p, im in zip(source_poses, src_images)]
        tgt_p = [pose_view(p, h, w) for p in target_poses]
        ref_hw = (h, w) if self.cfg.patch_reference == "view" else (2 * h, 2 * w)
        examples = [make_example(*compose(layout, src, src_p, tgt_p), layout.known, src_images[0], ref_size=ref_hw,
                                 dino_squash=self.cfg.dino_squash) for layout in layouts]
        return stack(examples), layouts, src, tgt_p

    def __call__(self, sources, source_poses, target_poses, *, view_size=(512, 512), seed: int = 42,
                 batch_size: int = 4, progress: bool = True) -> Generation:
        """Generates every target; see `generate_grids` for the batching and the noise."""
        batch, layouts, src, tgt_p = self._prepare(sources, source_poses, target_poses, view_size)
        grids = self.generate_grids(batch, seed=seed, batch_size=batch_size, progress=progress)
        targets: dict[int, np.ndarray] = {}
        for g, layout in enumerate(layouts):
            views = untile(grids[g])
            for slot, j in layout.targets():
                targets.setdefault(j, views[slot])
        return Generation([targets[j] for j in range(len(target_poses))], grids, layouts,
                          [(v + 1) / 2 for v in src], tgt_p)

    def generate_grids(self, batch: Batch, *, seed: int = 42, batch_size: int = 4, progress: bool = True,
                       indices=None) -> np.ndarray:
        """A `Batch` of G grids -> the decoded grids (G, 2H, 2W, 3) in [0, 1]. Grids run `batch_size` at a time (the
        last batch padded, so one compiled program serves all); each grid's starting noise depends only on `seed`
        and the grid's index: its position in `batch`, or `indices[g]` (e.g. its place in a whole test set, so that
        a grid's result does not depend on the batch it runs in)."""
        import jax
        from tqdm import tqdm
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        n = len(batch.grid)
        indices = range(n) if indices is None else [int(i) for i in indices]
        if len(indices) != n:
            raise ValueError(f"{len(indices)} noise indices for {n} grids")
        shape = self.sampler.latent_shape(*batch.grid.shape[1:3])
        noise = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(jax.random.key(seed), i), shape))
                          for i in indices])
        out = []
        bs = min(batch_size, n)
        for start in tqdm(range(0, n, bs), disable=not progress or n <= bs, desc="grids", unit="batch"):
            idx = np.minimum(np.arange(start, start + bs), n - 1)  # pad the last batch by repeating its last grid
            images = self.sampler(Batch(*(x[idx] for x in batch)), noise=noise[idx])
            out.append(images[: min(bs, n - start)])
        return np.concatenate(out)


def _as_list(x) -> list:
    """One image/pose (a path, PIL image or array) or a sequence of them -> a list (a lone path is one item, not
    a sequence of characters)."""
    if isinstance(x, (str, os.PathLike, Image.Image, np.ndarray)):
        return [x]
    return list(x)
