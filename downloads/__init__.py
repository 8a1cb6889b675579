"""Published weight files: where each comes from, and an explicit, hash-verified download command.

Nothing here runs unless the user types `onestep-sr fetch-weights`; the nodes never import it.
"""
