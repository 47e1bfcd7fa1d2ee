"""What the unit, end-to-end and container tests share, one concept a module: test modules import from here, never
from another test module or a conftest."""
