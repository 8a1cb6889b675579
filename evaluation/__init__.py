"""Scoring SR results as the papers do (pyiqa, METHODS.md §7): `onestep-sr eval` and
`onestep-sr benchmark-quality`. pyiqa comes with the `[eval]` extra and is imported only here."""
