"""A test CA of the test's own, and certificates it signs (python3-cryptography), for the
TLS tests: nothing here is trusted anywhere but where a test passes the files."""
import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _write_key(key, path):
    Path(path).write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))


class CA(object):
    """A CA in directory d: ca.pem (the certificate to trust) and its key in memory; with
    parent, an intermediate CA that parent signed, whose leaves' chains carry it."""

    def __init__(self, d, name="httpshim test CA", parent=None):
        self.dir = Path(d)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        issuer_name, issuer_key = (parent.name, parent.key) if parent else (self.name, self.key)
        self.cert = (x509.CertificateBuilder().subject_name(self.name).issuer_name(issuer_name)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(hours=1))
                     .not_valid_after(now + datetime.timedelta(days=2))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                  content_commitment=False, key_encipherment=False,
                                                  data_encipherment=False, key_agreement=False,
                                                  encipher_only=False, decipher_only=False), critical=True)
                     .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
                     .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                                    critical=False)
                     .sign(issuer_key, hashes.SHA256()))
        self.pem = self.dir / "ca.pem"
        self.pem.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self.chain_tail = self.pem.read_bytes() if parent else b""   # what a leaf's chain carries after it

    def empty_crl(self, stem="crl"):
        """A PEM file with this CA's certificate and a revocation list of it that revokes
        nothing (for a client that checks revocation: it trusts, and needs, both)."""
        now = datetime.datetime.now(datetime.timezone.utc)
        crl = (x509.CertificateRevocationListBuilder().issuer_name(self.name).last_update(now - datetime.timedelta(hours=1))
               .next_update(now + datetime.timedelta(days=1)).sign(self.key, hashes.SHA256()))
        path = self.dir / ("%s.pem" % stem)
        path.write_bytes(self.pem.read_bytes() + crl.public_bytes(serialization.Encoding.PEM))
        return path

    def leaf(self, names, stem="leaf", expired=False, client=False, rsa_bits=None, key_id=True, san=True):
        """(chain.pem, key.pem) for names (DNS names or IP literals), signed by this CA; with
        rsa_bits an RSA key of that size instead of P-256, without key_id no Authority Key
        Identifier (which a strict X.509 check requires), without san the first name only
        as the subject's common name."""
        key = rsa.generate_private_key(65537, rsa_bits) if rsa_bits else ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        if expired:
            start, end = now - datetime.timedelta(days=10), now - datetime.timedelta(days=1)
        else:
            start, end = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=1)
        sans = []
        for n in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                sans.append(x509.DNSName(n))
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
                   .issuer_name(self.name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(start).not_valid_after(end)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        if key_id:
            builder = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                                            critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        chain = self.dir / ("%s.pem" % stem)
        keyf = self.dir / ("%s.key" % stem)
        chain.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + self.chain_tail)
        _write_key(key, keyf)
        return chain, keyf
