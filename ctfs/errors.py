"""The typed errors every ctfs layer raises; each one's message is a single line a user can act on."""


class CtfsError(Exception):
    """Base of every error ctfs reports to a user."""


class FormatError(CtfsError):
    """A file is not a well-formed safetensors/CryptoTensors file."""


class IntegrityError(CtfsError):
    """A signature or an authentication tag did not verify: the bytes must not be trusted."""


class KeyUnavailable(CtfsError):
    """The key a file needs is not available, or key material is malformed."""


class UntrustedSigner(IntegrityError):
    """A header is signed by a key outside the trust store."""


class PolicyError(CtfsError):
    """A Rego policy is malformed or could not be evaluated."""


class PlainFileError(FormatError):
    """The file is plain safetensors, not encrypted: serving it would allow a downgrade."""


class AccessDenied(CtfsError):
    """A policy or the downgrade rule refuses an open."""


class StaleVersion(CtfsError):
    """A source file changed between the kernel's lookup and the open; the kernel looks it up again."""
