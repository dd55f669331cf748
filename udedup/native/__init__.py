"""The native boundary: the cffi builder (:mod:`.build`) and the only modules that import the
compiled extension ``udedup._native``. Everything above calls C through here."""
