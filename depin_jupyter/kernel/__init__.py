"""The notebook side: the %%depin magics, running a cell on a cluster, moving its variables, showing its output."""
