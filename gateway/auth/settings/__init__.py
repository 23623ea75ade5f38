"""The admission settings: consumers and their credentials, authentication methods, identity headers, limits,
and what each route accepts (`model`), read from the config file into frozen objects.
"""
