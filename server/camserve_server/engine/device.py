"""Getting a batch's pixels onto the device, and its answers back: the engine's data path.

On CPU a batch is ``np.stack`` of the items' uint8 pixels, byte for byte.

On CUDA:

- **Reusable pinned host buffers.** Two page-locked slots, sized for the largest batch seen,
  take turns: a batch's pixels are written into one slot and copied to the device with
  ``non_blocking=True``; a slot is written again only once its previous copy has finished
  (its event). No ``pin_memory()`` per batch.
- **A copy stream.** Copies and JPEG decoding run on a stream of their own; the compute stream
  waits on an event, so the engine can stage the *next* batch (copy it, decode its JPEGs)
  while the current one computes (``Engine.run_batch(items, upcoming=...)``).
- **JPEG decoded on the device.** Items whose pixels are a :class:`~camserve_server.domain.
  EncodedJpeg` (the handler checked the header: format, size limit) are decoded in one
  ``torchvision.io.decode_jpeg(list, device=...)`` call (nvJPEG on CUDA), and resized to the
  model's input on the device (bilinear with antialiasing, as Pillow's BILINEAR, rounded to
  uint8). A batch the device decoder refuses is decoded item by item; an item the device
  cannot decode is decoded on the host (libjpeg-turbo); an item nothing can decode answers
  INVALID_ARGUMENT alone.
- **Answers back in one copy.** Every tensor a batch answers with (logits, probabilities,
  maps) goes to the host in one transfer into a pinned buffer and one synchronisation,
  instead of one ``.cpu()`` per tensor.

The same decoding code runs on CPU when asked (``--jpeg-decode device``), which is how the
tests check it without a GPU.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..domain import EncodedJpeg, WorkItem
from ..errors import InvalidArgument, ServiceError

# torchvision 0.29 deprecates its image decoders for TorchCodec's; decode_jpeg still is the
# batched nvJPEG decoder. JPEG bytes are read-only buffers, which decode_jpeg only reads.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities",
                        category=DeprecationWarning)
warnings.filterwarnings("ignore", message="The given buffer is not writable",
                        category=UserWarning)


@dataclass
class Staged:
    """A batch on the device: the pixels of the items that decoded, in order, and an error
    for each item that did not. ``ready`` (CUDA) is recorded on the copy stream once the
    pixels are there."""

    key: Tuple[int, ...]
    pixels: torch.Tensor  # uint8 (n_ok, H, W, 3) on the device
    errors: Dict[int, ServiceError] = field(default_factory=dict)
    ready: Optional[torch.cuda.Event] = None


def key(items: Sequence[WorkItem]) -> Tuple[int, ...]:
    """A batch's identity (its items' objects), to find a batch staged in advance."""
    return tuple(id(item) for item in items)


class DataPath:
    """Stages batches onto one device and brings answers back. Owned by one engine (one
    worker thread): not thread-safe."""

    def __init__(self, device: torch.device, input_size: Tuple[int, int]) -> None:
        self.device = device
        self.input_size = tuple(input_size)
        self.cuda = device.type == "cuda"
        self._slots: List[Optional[torch.Tensor]] = [None, None]  # pinned uint8 host buffers
        self._slot_done: List[Optional[torch.cuda.Event]] = [None, None]
        self._next_slot = 0
        self._out: Optional[torch.Tensor] = None  # pinned float32 buffer for answers
        self._copy_stream = torch.cuda.Stream(device) if self.cuda else None

    # --- host -> device ---------------------------------------------------------------

    def stage(self, items: Sequence[WorkItem]) -> Staged:
        """Start moving a batch to the device (asynchronous on CUDA); :meth:`wait` before
        using its pixels on the compute stream."""
        arrays = [i for i, item in enumerate(items) if not isinstance(item.pixels, EncodedJpeg)]
        jpegs = [i for i, item in enumerate(items) if isinstance(item.pixels, EncodedJpeg)]
        if not self.cuda and not jpegs:
            # The CPU path: the host's pixels as they are.
            return Staged(key(items), torch.from_numpy(np.stack([it.pixels for it in items])))
        with self._stream():
            raw = self._copy_arrays([items[i].pixels for i in arrays]) if arrays else None
            decoded, errors = self._decode([items[i].pixels for i in jpegs]) if jpegs else ({},
                                                                                       {})
            errors = {jpegs[j]: e for j, e in errors.items()}
            if not jpegs:
                pixels = raw
            else:
                h, w = self.input_size
                pixels = torch.empty((len(items), h, w, 3), dtype=torch.uint8,
                                     device=self.device)
                if raw is not None:
                    pixels[torch.tensor(arrays, device=self.device)] = raw
                for j, image in decoded.items():
                    pixels[jpegs[j]] = image
                if errors:
                    ok = [i for i in range(len(items)) if i not in errors]
                    pixels = pixels[torch.tensor(ok, dtype=torch.long, device=self.device)]
            ready = None
            if self.cuda:
                ready = torch.cuda.Event()
                ready.record(self._copy_stream)
        return Staged(key(items), pixels, errors, ready)

    def wait(self, staged: Staged) -> torch.Tensor:
        """The staged pixels, safe to use on the current (compute) stream."""
        if staged.ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(staged.ready)
            # The caching allocator must not reuse this memory before the compute stream is
            # done with it.
            staged.pixels.record_stream(current)
        return staged.pixels

    def _stream(self):
        return torch.cuda.stream(self._copy_stream) if self.cuda else contextlib.nullcontext()

    def _copy_arrays(self, arrays: List[np.ndarray]) -> torch.Tensor:
        if not self.cuda:
            return torch.from_numpy(np.stack(arrays))
        n = len(arrays)
        shape = arrays[0].shape
        slot = self._next_slot
        self._next_slot = 1 - slot
        done = self._slot_done[slot]
        if done is not None:
            done.synchronize()  # this slot's previous copy has left it
        buffer = self._slots[slot]
        if buffer is None or buffer.shape[0] < n or tuple(buffer.shape[1:]) != shape:
            buffer = torch.empty((n, *shape), dtype=torch.uint8).pin_memory()
            self._slots[slot] = buffer
        host = buffer[:n]
        host_np = host.numpy()
        for i, array in enumerate(arrays):
            host_np[i] = array
        pixels = host.to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record(self._copy_stream)
        self._slot_done[slot] = event
        return pixels

    def _decode(self, jpegs: List[EncodedJpeg]) -> Tuple[Dict[int, torch.Tensor], Dict[int,
                                                                                      Exception]]:
        """Each JPEG decoded and resized to the input size, uint8 (H, W, 3) on the device, by
        its index; an error by index for those that cannot be decoded."""
        from torchvision.io import ImageReadMode, decode_jpeg

        data = [torch.frombuffer(j.data, dtype=torch.uint8) for j in jpegs]
        device = str(self.device)
        images: Dict[int, torch.Tensor] = {}
        errors: Dict[int, Exception] = {}
        try:
            images = dict(enumerate(decode_jpeg(data, mode=ImageReadMode.RGB, device=device)))
        except Exception:  # one bad JPEG fails the whole call: item by item
            for i, d in enumerate(data):
                try:
                    images[i] = decode_jpeg(d, mode=ImageReadMode.RGB, device=device)
                except Exception:
                    try:  # the device's decoder refuses some JPEGs the host's reads
                        images[i] = decode_jpeg(d, mode=ImageReadMode.RGB).to(
                            self.device, non_blocking=False)
                    except Exception as exc:
                        errors[i] = InvalidArgument(
                            f"could not be decoded as JPEG: {_reason(exc)}",
                            reason="INVALID_IMAGE")
        resized = {}
        for i, image in images.items():
            if tuple(image.shape[1:]) != tuple(jpegs[i].size):
                errors[i] = InvalidArgument(
                    f"decoded as {image.shape[2]}x{image.shape[1]}, but its header says "
                    f"{jpegs[i].size[1]}x{jpegs[i].size[0]}", reason="INVALID_IMAGE")
                continue
            resized[i] = self.resize(image)
        return resized, errors

    def resize(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 (3, h, w) → uint8 (H, W, 3) at the input size: bilinear with antialiasing
        (what Pillow's BILINEAR does when shrinking), rounded."""
        h, w = self.input_size
        if tuple(image.shape[1:]) == (h, w):
            return image.permute(1, 2, 0)
        x = F.interpolate(image[None].float(), size=(h, w), mode="bilinear",
                          align_corners=False, antialias=True)
        return x[0].round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0)

    # --- device -> host ---------------------------------------------------------------

    def to_host(self, tensors: Sequence[torch.Tensor]) -> List[np.ndarray]:
        """float32 NumPy copies of the tensors, in order: on CUDA in one transfer into a
        pinned buffer and one synchronisation."""
        if not self.cuda:
            return [t.float().cpu().numpy() for t in tensors]
        flat = [t.detach().float().reshape(-1) for t in tensors]
        total = sum(f.numel() for f in flat)
        if total == 0:
            return [np.zeros(tuple(t.shape), np.float32) for t in tensors]
        if self._out is None or self._out.numel() < total:
            self._out = torch.empty(max(total, 1 << 16), dtype=torch.float32).pin_memory()
        host = self._out[:total]
        host.copy_(torch.cat(flat), non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        out, start = [], 0
        array = host.numpy()
        for t, f in zip(tensors, flat):
            out.append(array[start:start + f.numel()].reshape(tuple(t.shape)).copy())
            start += f.numel()
        return out


def _reason(exc: Exception) -> str:
    """A decoder's error, without the source file and line torchvision puts first."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text.rsplit(", ", 1)[-1][:200]
