"""A model adapter for stand-in networks whose outputs are known by hand."""

from distill.models.flow_matching import FlowMatchingAdapter


class StandInAdapter(FlowMatchingAdapter):
    """Calls module(x_t, timestep, text) and remembers the timestep it passed."""

    def forward(self, module, x_t, timestep, text):
        self.last_timestep = timestep
        return module(x_t, timestep, text)

    def load_transformer(self, path, seed):
        raise NotImplementedError("stand-in networks are built by the test")

    def empty_transformer(self, path):
        raise NotImplementedError("stand-in networks are built by the test")

    def blocks(self, module):
        return []
