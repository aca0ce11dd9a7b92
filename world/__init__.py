"""The embedded demo world: a tiny text-to-image model and digit-classifier rewards, built offline from a seed.

Not part of the pipeline: the demo uses it the way a user uses their own model and reward plug-in.
"""
