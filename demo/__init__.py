"""The built-in demo of ctfs and the tiny model it makes; not part of the installed package."""
