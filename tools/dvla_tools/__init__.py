"""dvla_tools: the user's command line (``dvla ...``) and the benchmarks behind ``dvla bench``."""

__all__: list[str] = []
