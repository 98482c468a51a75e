"""Students, teachers, feature taps and losses of KOALA distillation."""

import logging
import warnings

# bitsandbytes (the low-memory profile's 8-bit AdamW), imported by diffusers whenever it is installed, warns on
# CPUs with AVX512-BF16 that an optional 4-bit matmul kernel package is missing; nothing here uses 4-bit matmuls.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# Without torchvision (CPU installs), transformers substitutes the PIL image processors for CLIP/SigLIP, which is
# what the CLIP score here uses anyway, and warns about it once per class on every run, before a config error too.
logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)


class _EmptyFloat32ListFilter(logging.Filter):
    """diffusers 0.42 warns on every dtype cast of a model that modules of it "should be kept in float32", also
    when that list is empty (its check compares `... or []` with None; huggingface/diffusers#13872): the empty case
    says nothing and is dropped, a real list still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []." not in record.getMessage()


logging.getLogger("diffusers.models.modeling_utils").addFilter(_EmptyFloat32ListFilter())

# DeepSpeed's ZeRO-2 gathers its partitions with torch.distributed.all_gather_into_tensor, which torch 2.13
# deprecates in a FutureWarning printed on every rank at every step; nothing in this project calls it.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                        category=FutureWarning)
