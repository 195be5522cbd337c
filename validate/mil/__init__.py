"""edgeq's MIL reference executor: Core ML ML programs (.mlpackage) read and executed in numpy, on any OS.

`read_program` reads the stored program (protobuf + weight blobs, coremltools' proto classes only);
`MILExecutor` runs its main function op by op (`ops.OPS` lists the op types it implements). It is a reference
for the program's semantics, not Apple's Core ML runtime, and says so in its `label`.
"""

from edgeq.validate.mil.executor import MILExecutor
from edgeq.validate.mil.ops import OPS, UnsupportedOp
from edgeq.validate.mil.program import MILError, Program, read_program

__all__ = ["MILError", "MILExecutor", "OPS", "Program", "UnsupportedOp", "read_program"]
