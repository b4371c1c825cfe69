"""An example liptune plugin: the network ``bar-net`` and the data set ``bars``."""
