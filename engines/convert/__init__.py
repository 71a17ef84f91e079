"""Conversion of models in other frameworks' formats to ONNX, the format every later stage takes.

- `pt2_archive.py`: a `torch.export` program (`.pt2`, written by `torch.export.save`) checked member
  by member and loaded without unpickling anything or evaluating any string it holds
  (`torch.export.load` does both: see that module's docstring).
- `torch_export.py`: that program exported to ONNX by `torch.onnx.export(dynamo=True)`, dynamic dims
  kept, errors naming the operators the exporter cannot translate.

torch and onnxscript are imported inside the functions: this package imports without them.
"""

from engines.convert.torch_export import ConversionResult, convert_exported_program

__all__ = ["ConversionResult", "convert_exported_program"]
