"""Gradient compression as Horovod spells it: `hvd.Compression.none`, `.fp16`, and `.bf16`.

A compressor casts floating-point tensors to a 16-bit type for the trip
through MPI and back to their own type afterwards; integer tensors pass
unchanged. Halves the bytes on the wire at the cost of rounding the sum.
"""
import torch

__all__ = ["Compressor", "NoneCompressor", "FP16Compressor", "BF16Compressor", "Compression"]


class Compressor:
    """compress(tensor) -> (tensor to send, context); decompress(tensor, context) -> tensor."""
    wire_dtype = None  # the dtype floating-point tensors travel in (None: their own)

    @classmethod
    def compress(cls, tensor):
        if cls.wire_dtype is None or not tensor.dtype.is_floating_point:
            return tensor, None
        return tensor.to(cls.wire_dtype), tensor.dtype

    @staticmethod
    def decompress(tensor, ctx):
        return tensor if ctx is None else tensor.to(ctx)


class NoneCompressor(Compressor):
    """The default: tensors travel as they are."""


class FP16Compressor(Compressor):
    """IEEE half precision: 10-bit mantissa, overflows above 65504."""
    wire_dtype = torch.float16


class BF16Compressor(Compressor):
    """bfloat16: float32's range, 7-bit mantissa (not in Horovod; reduced by distml's own MPI operator)."""
    wire_dtype = torch.bfloat16


class Compression:
    """Optional gradient compression used during allreduce."""
    none = NoneCompressor
    fp16 = FP16Compressor
    bf16 = BF16Compressor
