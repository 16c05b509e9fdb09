"""Certificate files checked before they serve: readable, PEM, a key that matches, and the
names and expiry they carry (the config check and the listener's TLS both use these)."""

from __future__ import annotations

import datetime
import ssl


class CertificateError(ValueError):
    """A certificate or key that cannot serve, with the field to blame (cert_file, key_file)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def check_key_pair(cert_file: str, key_file: str) -> tuple[tuple[str, ...], datetime.datetime]:
    """The certificate's names and expiry (certificate_facts); CertificateError naming the
    field at fault when the pair cannot serve."""
    for field, path in (("cert_file", cert_file), ("key_file", key_file)):
        try:
            with open(path, "rb"):
                pass
        except OSError as error:
            raise CertificateError(field, f"cannot read {path}: {error.strerror}") from None
    facts = certificate_facts(cert_file)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as error:
        if "KEY_VALUES_MISMATCH" in str(error) or "key values mismatch" in str(error):
            raise CertificateError("key_file", f"{key_file} is not the private key of the "
                                   f"certificate in {cert_file}") from None
        raise CertificateError("key_file", f"{key_file} is not a usable private key in PEM "
                               f"format ({error.reason or error})") from None
    return facts


def certificate_facts(cert_file: str) -> tuple[tuple[str, ...], datetime.datetime]:
    """The DNS names a PEM certificate serves (its subjectAltName, else its common name) and
    its expiry."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        with open(cert_file, "rb") as file:
            certificate = x509.load_pem_x509_certificate(file.read())
    except OSError as error:
        raise CertificateError("cert_file", f"cannot read {cert_file}: {error.strerror}") from None
    except ValueError as error:
        raise CertificateError("cert_file", f"{cert_file} is not a certificate in PEM format "
                               f"({error})") from None
    try:
        alternative = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value
        names = tuple(name.lower() for name in alternative.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        names = tuple(str(attribute.value).lower() for attribute in
                      certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME))
    return names, certificate.not_valid_after_utc
