"""Moved: the image pipeline is :mod:`locakd.image`, the shared run machinery :mod:`locakd.engine`.

The modules here (``image_config``, ``image_trainer``, ``checkpoint``, ``distributed``, ``run_dir``,
``runtime``) re-export the new ones so old imports keep working for one release.
"""
