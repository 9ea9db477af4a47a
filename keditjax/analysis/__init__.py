"""Analysis tools that locate knowledge in a model (causal tracing)."""

from keditjax.analysis.tracing import (GROUPS, KINDS, Trace, average_traces,
                                       causal_trace, corruption_noise,
                                       embedding_std, peak_layers, plot_average,
                                       plot_trace, subject_range, to_json)

__all__ = ["GROUPS", "KINDS", "Trace", "average_traces", "causal_trace",
           "corruption_noise", "embedding_std", "peak_layers", "plot_average",
           "plot_trace", "subject_range", "to_json"]
