"""What went wrong, what to do about it, and the exit code that says so.

A refusal from a service arrives as a gRPC status with a ``google.rpc.ErrorInfo``: a
stable ``reason`` and metadata (``next_allowed_at``, ``peer``, ``feature`` …). ``explain``
turns it into a ``Failure``: the service's own message, one line of advice keyed by the
reason, and an exit code from the status:

====  =====================================================================
0     done
1     a service refused (nothing changed), or failed
2     usage: a flag, argument, ID or file is not valid (ours or INVALID_ARGUMENT)
3     a service, or a peer it needs, is unreachable (UNAVAILABLE, no answer in time)
4     the bearer token is missing or was not accepted (UNAUTHENTICATED, ROLE_NOT_ALLOWED)
5     a check found a problem: trusted storage broken, audit log not intact
130   interrupted (Ctrl-C)
====  =====================================================================
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import grpc

from tessera.rpc import error_info


class ExitCode(enum.IntEnum):
    OK = 0
    REFUSED = 1
    USAGE = 2
    UNREACHABLE = 3
    CREDENTIALS = 4
    PROBLEM_FOUND = 5
    INTERRUPTED = 130


class Service(enum.Enum):
    """The services the CLI talks to, in the operator's words."""

    ADMINISTRATOR = "Administrator"
    LICENSE_SERVER = "License Server"
    ACTIVATION_SERVER = "Activation Server"


# Where each service's address is set, for the advice on an unreachable one.
SETTING_OF = {
    Service.ADMINISTRATOR: "--administrator / TESSERA_ADMINISTRATOR",
    Service.LICENSE_SERVER: "--license-server / TESSERA_LICENSE_SERVER",
    Service.ACTIVATION_SERVER: "--activation-server / TESSERA_ACTIVATION_SERVER",
}


@dataclass(frozen=True)
class Failure:
    """A command that did not succeed, told to a person (stderr) or a script (--json)."""

    exit_code: ExitCode
    message: str
    hint: str = ""
    code: str = ""
    reason: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    service: str = ""


class CliError(Exception):
    """Ends a command with a Failure."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure


class UsageError(CliError):
    """What the user typed (or configured) cannot work; nothing was sent."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(Failure(ExitCode.USAGE, message, hint, reason="USAGE"))


ADDRESS_HINT = (
    "Write the address as EBO does: @host (ports 27000-27009), port@host, several "
    "separated by ';', e.g. @localhost or 27000@es-host."
)


class InvalidAddress(CliError):
    """A License Server address that does not parse (EBO's "Invalid license server
    configuration"): the same reason as when a service refuses it; nothing was sent."""

    def __init__(self, message: str) -> None:
        super().__init__(
            Failure(
                ExitCode.USAGE,
                message,
                ADDRESS_HINT,
                reason="INVALID_LICENSE_SERVER_ADDRESS",
                metadata={"field": "license_server"},
            )
        )


@dataclass(frozen=True)
class Situation:
    """What a hint may draw on: the call's metadata and the service that answered."""

    metadata: Mapping[str, str]
    service: Service
    target: str
    operation_id: str

    def get(self, key: str, default: str = "?") -> str:
        return self.metadata.get(key) or default

    @property
    def resume(self) -> str:
        if not self.operation_id:
            return ""
        return (
            f" Run the same command again with --operation-id {self.operation_id} to resume "
            "this operation; it completes exactly once."
        )


Hint = Callable[[Situation], str]


def _repair_limit(s: Situation) -> str:
    when = s.get("next_allowed_at", "")
    if when.startswith("9999-"):  # the vendor's limit is 0: no date ever fits
        allowed = "This Activation Server allows no repairs at all."
    else:
        date = f" from {when[:10]} ({when})" if when else " later"
        allowed = f"The vendor allows the next repair of this License Server{date}."
    return (
        f"{allowed} Until then the broken certificates do not serve; contact the vendor if "
        "that cannot wait."
    )


def _peer_unavailable(s: Situation) -> str:
    peer = s.get("peer", "peer")
    address = s.get("address", "its address")
    if peer == Service.ACTIVATION_SERVER.value:
        where = "the Administrator's --activation-server setting and the Internet link"
    else:
        where = f"the License Server address ({SETTING_OF[Service.LICENSE_SERVER]})"
    return (
        f"The {s.service.value} is up but could not reach the {peer} at {address}. Start the "
        f"{peer} or check {where}; then try again." + s.resume
    )


def _credential(s: Situation) -> str:
    if s.get("peer", "") == Service.LICENSE_SERVER.value:
        return (
            "The License Server did not accept the Administrator's own credential. Start the "
            "Administrator with --license-server-token-file naming the License Server's "
            "administrator-token (in its data directory; `make up` does this), or give the "
            "License Server that token's digest (--administrator-token-sha256)."
        )
    if s.service is Service.ACTIVATION_SERVER:
        return (
            "Give the vendor-staff token: TESSERA_VENDOR_TOKEN, --vendor-token-file, or "
            "vendor_token in the config file (`make up` keeps it in "
            "var/activation_server/vendor-token)."
        )
    if s.service is Service.ADMINISTRATOR:
        return (
            "Give the Administrator's operator token: TESSERA_ADMINISTRATOR_TOKEN, "
            "--administrator-token-file, or administrator_token in the config file (the "
            "Administrator keeps it in its data directory as operator-token; `make up`: "
            "var/administrator/operator-token)."
        )
    return (
        "Give the operator token: TESSERA_OPERATOR_TOKEN, --operator-token-file, or "
        "operator_token in the config file (the License Server keeps it in its data "
        "directory as operator-token; `make up`: var/license_server/operator-token)."
    )


def _activation_limit(s: Situation) -> str:
    when = s.get("next_allowed_at", "")
    if when.startswith("9999-"):  # the vendor's limit is 0: no date ever fits
        return "This Activation Server activates no network licenses; contact the vendor."
    date = f" from {when[:10]} ({when})" if when else " later"
    return (
        f"The order was activated as often as the vendor allows in its window; the next "
        f"activation fits{date}. Contact the vendor if that cannot wait."
    )


HINTS: dict[str, Hint] = {
    "REPAIR_LIMIT_REACHED": _repair_limit,
    "ACTIVATION_LIMIT_REACHED": _activation_limit,
    "SEATS_IN_USE": lambda s: (
        f"{s.get('used')} seat(s) of {s.get('feature')} are leased. Wait until their holders "
        "check in (`tessera leases` shows who), or run again with --force to revoke those "
        "leases (each holder is told at once)."
    ),
    "TRUSTED_STORAGE_BROKEN": lambda s: (
        "Run `tessera trust` to see what broke and what a repair would do, then "
        "`tessera repair` (needs the vendor; at most 4 repairs a year)."
    ),
    "NOTHING_TO_REPAIR": lambda s: (
        "Trusted storage is healthy (`tessera trust`), so nothing was sent to the vendor and "
        "no repair was counted. Repair anyway only if the vendor records licenses this "
        "License Server lacks: `tessera repair --force` (it counts as one of the 4 a year)."
    ),
    "PEER_UNAVAILABLE": _peer_unavailable,
    "CREDENTIAL_MISSING": _credential,
    "CREDENTIAL_INVALID": _credential,
    "ROLE_NOT_ALLOWED": lambda s: (
        f"The token is valid but its role ({s.get('role', '?')}) may not do this; " + _credential(s)
    ),
    "ENTITLEMENT_NOT_FOUND": lambda s: (
        "Check the Entitlement ID on the entitlement certificate; the vendor has no such order."
    ),
    "ACTIVATION_ID_NOT_FOUND": lambda s: (
        "`tessera order ENTITLEMENT_ID` lists the order's lines and their activation IDs."
    ),
    "NOT_ENOUGH_SEATS_LEFT": lambda s: (
        f"The line has {s.get('available')} seat(s) left; `tessera order` shows what is left. "
        "Return seats from another License Server or ask the vendor for more."
    ),
    "LINE_EXPIRED": lambda s: "The order line has expired; ask the vendor for a new one.",
    "LOCAL_LINE_NOT_FOR_LICENSE_SERVER": lambda s: (
        "This line is for local (node-locked) licenses of a client host, not a License Server."
    ),
    "NO_SEAT_AVAILABLE": lambda s: (
        "Every seat is in use: `tessera leases` shows who holds them; `tessera revoke` frees "
        "one, `tessera activate` adds more."
    ),
    "FEATURE_NOT_LICENSED": lambda s: (
        "No seats of this feature are activated here; `tessera activate` adds them."
    ),
    "RETURN_LIMIT_REACHED": lambda s: (
        "The vendor limits how often a certificate may be returned (the cycling limit); the "
        "seats serve again here. Try later, or ask the vendor."
    ),
    "PARTIAL_RETURN_NOT_ALLOWED": lambda s: (
        "What one activation brought returns together: leave out --count to return the "
        "whole certificate."
    ),
    "RETURN_IN_PROGRESS": lambda s: (
        "Another return of this certificate is under way: `tessera operations --unfinished` "
        "shows it; run it again with its --operation-id to complete it."
    ),
    "CERTIFICATE_NOT_FOUND": lambda s: (
        "`tessera licenses` lists the certificates this License Server holds."
    ),
    "CERTIFICATE_RETURNED": lambda s: "That certificate was returned already.",
    "CERTIFICATE_EXPIRED": lambda s: (
        "An expired certificate is not credited back (a return is no renewal); it simply "
        "stops serving. Ask the vendor for a new order line."
    ),
    "CERTIFICATE_NOT_HELD": lambda s: (
        "The vendor records that certificate as returned already (or force-returned)."
    ),
    "CERTIFICATE_FOR_ANOTHER_HOST": lambda s: (
        f"This answer belongs to another License Server (host {s.get('host_id')}): import it "
        "on the License Server that exported the request (--license-server)."
    ),
    "RESPONSE_MISMATCH": lambda s: (
        "The response file does not answer the operation it names; submit the request "
        "file again and import the new answer."
    ),
    "NOT_A_TESSERA_FILE": lambda s: (
        "Give the file `tessera export-request` or `tessera submit` wrote "
        "(-----BEGIN TESSERA …-----)."
    ),
    "WRONG_FILE_TYPE": lambda s: (
        "`tessera submit` takes the request file; `tessera import-response` takes the "
        "response file `submit` wrote."
    ),
    "BAD_SIGNATURE": lambda s: (
        "A signed document was altered on the way, or forged; nothing changed. For an "
        "answer file: `tessera submit` the request file again (the vendor gives the same "
        "answer) and import the file it writes."
    ),
    "DAMAGED_FILE": lambda s: (
        "The file was cut or altered on the way; copy it again (byte for byte, no editor)."
    ),
    "UNSUPPORTED_FILE_VERSION": lambda s: (
        "The file was written by another version of Tessera; use matching versions."
    ),
    "FILE_TOO_LARGE": lambda s: "That is not a request or response file.",
    "INVALID_LICENSE_SERVER_ADDRESS": lambda s: ADDRESS_HINT,
    "INVALID_INPUT": lambda s: (
        f"Check {s.get('field', 'the input')}; IDs carry a check character, so a typo is "
        "caught before anything is sent to the vendor."
    ),
    "OPERATION_NOT_FOUND": lambda s: (
        "`tessera operations` lists this Administrator's journal. A response file is "
        "imported through the Administrator that exported its request (--administrator)."
    ),
    "OPERATION_ID_REUSED": lambda s: (
        "That --operation-id belongs to another operation; leave it out or pick a new one."
    ),
    "OPERATION_HOST_CHANGED": lambda s: (
        "The address now answers with another License Server than when the operation "
        "started; point --license-server at the original one."
    ),
    "SAME_LICENSE_SERVER": lambda s: "--to must name another License Server than --from.",
    "LOCAL_LICENSE_NOT_RETURNABLE": lambda s: (
        "Local (node-locked) licenses cannot be returned; they end when they expire."
    ),
    "LOCAL_LICENSE_NOT_REPAIRABLE": lambda s: "Local (node-locked) licenses cannot be repaired.",
    "REPAIR_FROM_ANOTHER_HOST": lambda s: (
        f"Only the host key the licenses were activated with (host {s.get('host_id')}) may "
        "repair them. Put that host.key back in the License Server's data directory and "
        "restart it (`tessera trust` then says whether a repair is still needed); if the key "
        "is lost, ask the vendor to force-return the certificates, then activate again."
    ),
    "RETURN_FROM_ANOTHER_HOST": lambda s: (
        "Only the License Server holding the certificate may return it; ask the vendor for "
        "a forced return if that server is gone."
    ),
    "CALL_DEADLINE_EXCEEDED": lambda s: (
        f"The {s.service.value} ended the call at its own limit "
        f"({s.get('max_call_seconds')} s, --max-call-seconds) and changed nothing; try again. "
        "If it keeps happening, its database is slow or locked: see its log." + s.resume
    ),
    "SERVER_SHUTTING_DOWN": lambda s: f"The {s.service.value} is stopping; try again shortly.",
    "UNKNOWN_FEATURE": lambda s: f"{s.get('feature')} is not in the vendor's catalog.",
}


def _exit_code_for(code: grpc.StatusCode) -> ExitCode:
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return ExitCode.UNREACHABLE
    if code is grpc.StatusCode.UNAUTHENTICATED:
        return ExitCode.CREDENTIALS
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        return ExitCode.USAGE
    return ExitCode.REFUSED


def explain(
    error: grpc.aio.AioRpcError,
    service: Service,
    target: str,
    operation_id: str = "",
    timeout: float = 0,
) -> Failure:
    """A failed call as a Failure: message, advice, exit code."""
    code = error.code()
    info = error_info(error)
    reason = info.reason if info is not None else ""
    metadata = dict(info.metadata) if info is not None else {}
    situation = Situation(metadata, service, target, operation_id)
    exit_code = _exit_code_for(code)
    if reason == "ROLE_NOT_ALLOWED":
        exit_code = ExitCode.CREDENTIALS  # a token of another role: not accepted either
    details = error.details() or code.name
    if not reason and code is grpc.StatusCode.UNAVAILABLE:
        # Nobody answered at all: our own connection, not a refusal.
        return Failure(
            exit_code,
            f"cannot reach the {service.value} at {target}",
            f"Is it running (`make up` starts all three)? Its address is set with "
            f"{SETTING_OF[service]}; `tessera config` shows the one in use. A service that "
            "serves TLS needs --tls-ca (and --tls-cert/--tls-key for mutual TLS)."
            + situation.resume,
            code=code.name,
            reason="UNREACHABLE",
            service=service.value,
        )
    if code is grpc.StatusCode.DEADLINE_EXCEEDED and reason != "CALL_DEADLINE_EXCEEDED":
        return Failure(
            exit_code,
            f"the {service.value} at {target} did not answer within {timeout:g} s",
            "Give it longer with --timeout."
            + (
                " `tessera operations --unfinished` shows whether the operation went through."
                if operation_id
                else ""
            )
            + situation.resume,
            code=code.name,
            reason=reason or "DEADLINE_EXCEEDED",
            metadata=metadata,
            service=service.value,
        )
    hint_for = HINTS.get(reason)
    hint = hint_for(situation) if hint_for is not None else ""
    if not hint and code is grpc.StatusCode.INTERNAL:
        hint = f"The {service.value} failed unexpectedly; its log has the details."
    if not hint and code is grpc.StatusCode.UNIMPLEMENTED:
        hint = f"Is {target} really the {service.value}? Check {SETTING_OF[service]}."
    return Failure(
        exit_code,
        details,
        hint,
        code=code.name,
        reason=reason,
        metadata=metadata,
        service=service.value,
    )
