"""Lab material shipped with imgclf: the notebook `imgclf init` copies into a project."""
