"""Which checkpoint tensors make each parameter of a transformers model, by transformers' own loading rules.

transformers 5 keeps some weights in another form than checkpoints store them: a mixture-of-experts layer holds its
experts as one 3-D parameter per projection (gate and up fused into one), where the checkpoint has one tensor per
expert and projection. Its loader maps checkpoint names onto parameters with the model's conversion mapping
(renamings, and converters that stack and concatenate); this module asks the same mapping, forward to build a
parameter from the checkpoint and in reverse to split a parameter-shaped tensor (a gradient) back into the
checkpoint's tensors. So no architecture's names are written here, and a checkpoint tensor's GGUF name is then the
reading route's (source/converter.py, arch/).
"""
from __future__ import annotations

from copy import deepcopy
from typing import Callable, Optional

import torch

from ..errors import InputError
from ..source.checkpoint import Checkpoint


class CheckpointParameters:
    """Parameter name -> the checkpoint tensors it is made of (in transformers' loading order) and how."""

    def __init__(self, model: torch.nn.Module, checkpoint: Checkpoint):
        # imported here: they pull in torch.distributed (about 0.8 s), which every conversion would pay at startup
        # through the planners that take a calibration, while only a calibration builds this
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

        self.model = model
        transforms = get_model_conversion_mapping(model)
        renamings = [transform for transform in transforms if isinstance(transform, WeightRenaming)]
        converters = [transform for transform in transforms if isinstance(transform, WeightConverter)]
        self._converters = {pattern: converter for converter in converters for pattern in converter.source_patterns}
        # parameter -> [(checkpoint name, the converter's source pattern it matched, or None: taken as it is)]
        self.sources: dict[str, list[tuple[str, Optional[str]]]] = {}
        wanted = dict(model.named_parameters(remove_duplicate=False))
        for stored in sorted(checkpoint.records, key=dot_natural_key):
            name, pattern = rename_source_key(stored, renamings, converters, model.base_model_prefix, wanted)
            if name not in wanted and stored in wanted:   # as transformers' loader: a key renamed astray is kept
                name, pattern = stored, None
            if name in wanted:
                self.sources.setdefault(name, []).append((stored, pattern))

    def checkpoint_names(self, name: str) -> list[str]:
        """The checkpoint tensors parameter `name` is made of (empty: none)."""
        return [stored for stored, _ in self.sources.get(name, [])]

    def build(self, name: str, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """Parameter `name` made from the checkpoint tensors `read` returns, as transformers' loader makes it."""
        entries = self.sources.get(name)
        if not entries:
            raise InputError(f"the checkpoint has no tensor for '{name}' that the model's class needs")
        if entries[0][1] is None:
            return read(entries[0][0])
        converter = deepcopy(self._converters[entries[0][1]])
        for stored, pattern in entries:
            converter.add_tensor(name, stored, pattern, read(stored))
        return converter.convert(name, model=self.model, config=self.model.config)[name]

    def split(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """A tensor shaped like parameter `name` (its value, its gradient) cut into the checkpoint's tensors."""
        entries = self.sources[name]
        if entries[0][1] is None:
            return {entries[0][0]: tensor}
        reverse = self._converters[entries[0][1]].reverse_transform()
        reverse.add_tensor(name, name, reverse.source_patterns[0], tensor)
        # the pieces come back named by the converter's patterns, the tail of each checkpoint name
        pieces = reverse.convert(name, model=self.model, config=self.model.config)
        split = {}
        for stored in self.checkpoint_names(name):
            tails = [tail for tail in pieces if ("." + stored).endswith(tail if tail.startswith(".") else "." + tail)]
            if len(tails) != 1:
                raise InputError(f"transformers' conversion of '{name}' does not split back into the checkpoint's "
                                 f"tensor '{stored}'")
            split[stored] = pieces[tails[0]]
        return split
