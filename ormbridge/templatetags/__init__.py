"""Template tags of ormbridge: ``{% load ormbridge %}``."""
