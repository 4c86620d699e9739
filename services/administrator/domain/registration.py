"""Registration details: who the operator is, sent to the vendor with every activation.

EcoStruxure's License Administrator asks for the customer organisation and a contact
before it activates; the vendor stores them with every license it issues.
"""

from __future__ import annotations

import re

from services.administrator.domain.model import Registration
from services.administrator.domain.ports import JournalStore
from tessera.activation.v1.activation_pb2 import Registration as RegistrationProto
from tessera.clock import Clock
from tessera.errors import InvalidInput
from tessera.validation import checked_text

MAX_NAME = 200
MAX_EMAIL = 254
MAX_PHONE = 40
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_PHONE = re.compile(r"^\+?[0-9 ()./\-]+$")


def checked_registration(
    details: RegistrationProto, *, required: bool, field: str = "registration"
) -> Registration:
    """The details stripped and checked; the organisation only when ``required``."""
    email = checked_text(f"{field}.email", details.email, MAX_EMAIL)
    if email and not _EMAIL.match(email):
        raise InvalidInput(f"{field}.email", f"{email!r} is not an e-mail address")
    phone = checked_text(f"{field}.phone", details.phone, MAX_PHONE)
    if phone and not _PHONE.match(phone):
        raise InvalidInput(f"{field}.phone", "digits, spaces and + ( ) . / - only")
    return Registration(
        organization=checked_text(
            f"{field}.organization", details.organization, MAX_NAME, required=required
        ),
        contact_name=checked_text(f"{field}.contact_name", details.contact_name, MAX_NAME),
        email=email,
        phone=phone,
        site=checked_text(f"{field}.site", details.site, MAX_NAME),
    )


def registration_to_proto(details: Registration) -> RegistrationProto:
    return RegistrationProto(
        organization=details.organization,
        contact_name=details.contact_name,
        email=details.email,
        phone=details.phone,
        site=details.site,
    )


class Registrations:
    """The registration details stored in the Administrator's database."""

    def __init__(self, journal: JournalStore, clock: Clock) -> None:
        self.journal = journal
        self.clock = clock

    async def get(self) -> Registration:
        """The stored details; all empty when none were set yet."""
        async with self.journal.transaction() as repo:
            stored = await repo.get_registration()
        return stored or Registration()

    async def set(self, details: RegistrationProto) -> Registration:
        """Check and store the details (the organisation is required); returns them."""
        registration = checked_registration(details, required=True)
        async with self.journal.transaction() as repo:
            await repo.put_registration(registration, self.clock.now())
        return registration

    async def for_vendor(self) -> RegistrationProto:
        """What to send with an activation."""
        return registration_to_proto(await self.get())
