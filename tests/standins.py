"""A model adapter for stand-in networks whose outputs are known by hand."""

from distill.models.flow_matching import FlowMatchingAdapter


class StandInAdapter(FlowMatchingAdapter):
    """Calls module(x_t, timestep, text) and remembers the timestep it passed."""

    family = "stand_in"  # used directly by the tests, never registered

    def forward(self, module, x_t, timestep, text, **cond):
        self.last_timestep = timestep
        return module(x_t, timestep, text)

    def load(self, path, seed, dtype=None):
        raise NotImplementedError("stand-in networks are built by the test")

    def empty(self, path, dtype=None):
        raise NotImplementedError("stand-in networks are built by the test")

    def blocks(self, module):
        return []

    def save(self, module, folder):
        raise NotImplementedError("stand-in networks are not exported")
