"""The migration core: one state machine per migration (``job``), its parameters and
capabilities, what it needs of a VM (``vm``), guest stop/resume around a switchover
(``guest``) and the bandwidth limit (``rate``)."""
