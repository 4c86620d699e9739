"""Human output: what each answer looks like on a terminal.

Tables shorten UUIDs to their first 8 characters (any unique prefix is accepted back as
input; ``--json`` has them whole). Times are UTC.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from google.protobuf.timestamp_pb2 import Timestamp

from tessera.activation.v1 import activation_pb2 as apb
from tessera.admin.v1 import admin_pb2
from tessera.license.v1 import license_pb2 as lpb
from tessera_cli import records
from tessera_cli.terminal import Cell, Column, Row, Style, pairs, table

_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def short(identifier: str) -> str:
    """A UUID's first 8 characters; any other id whole."""
    return identifier[:8] if _UUID.match(identifier) else identifier


def clock(stamp: Timestamp, with_seconds: bool = False) -> str:
    moment = stamp.ToDatetime()
    return moment.strftime("%Y-%m-%d %H:%M:%S" if with_seconds else "%Y-%m-%d %H:%M") + " UTC"


def date_or(present: bool, stamp: Timestamp, otherwise: str) -> str:
    return stamp.ToDatetime().strftime("%Y-%m-%d") if present else otherwise


# ---------------------------------------------------------------------------------------
# Orders and certificates
# ---------------------------------------------------------------------------------------


def _line_expiry(line: apb.EntitlementLine) -> str:
    if line.HasField("expires_at"):
        return line.expires_at.ToDatetime().strftime("%Y-%m-%d")
    if line.HasField("duration"):
        days = line.duration.seconds // 86400
        return f"{days} d after activation" if days else f"{line.duration.seconds} s after"
    return "never"


def _span(seconds: int) -> str:
    if seconds % 86400 == 0:
        return f"{seconds // 86400} d"
    if seconds % 3600 == 0:
        return f"{seconds // 3600} h"
    return f"{seconds // 60} min"


def entitlement(style: Style, e: apb.Entitlement, hint: bool = True) -> str:
    who = e.customer_organization + (f" ({e.contact})" if e.contact else "")
    rows: list[Row] = [
        [
            Cell(line.activation_id, "accent"),
            line.feature,
            records.license_kind(line.kind),
            str(line.count),
            str(line.activated),
            Cell(str(line.available), "" if line.available else "warn"),
            _line_expiry(line),
            "per seat" if line.partial_return_allowed else "whole",
        ]
        for line in e.lines
    ]
    text = "\n".join(
        [
            f"Order {style.bold(e.entitlement_id)} for {who}",
            "",
            table(
                style,
                [
                    Column("Activation ID"),
                    Column("Feature"),
                    Column("Kind"),
                    Column("Sold", right=True),
                    Column("Activated", right=True),
                    Column("Left", right=True),
                    Column("Expires"),
                    Column("Returns"),
                ],
                rows,
            ),
        ]
    )
    checked = [line for line in e.lines if line.HasField("check_in_interval")]
    if checked:
        text += "\n\n" + "\n".join(
            f"{line.activation_id}: check in with the vendor every "
            f"{_span(line.check_in_interval.seconds)}, grace "
            f"{_span(line.check_in_grace.seconds)}"
            for line in checked
        )
    if hint and e.lines:
        text += "\n\n" + style.dim(
            f"Activate with: tessera activate {e.entitlement_id} --feature FEATURE --count N"
        )
    return text


# ---------------------------------------------------------------------------------------
# Journaled operations
# ---------------------------------------------------------------------------------------

_STATE_TONES = {"completed": "ok", "refused": "bad", "prepared": "warn", "answered": "warn"}


def operation_state(op: admin_pb2.Operation) -> Cell:
    state = records.operation_state(op.state)
    return Cell(state, _STATE_TONES.get(state, ""))


def _operation_subject(op: admin_pb2.Operation) -> str:
    kind = records.operation_kind(op.kind)
    if kind in ("activate", "activate_local"):
        return f"{op.count} x {op.activation_id}"
    if kind == "return":
        seats = f"{op.count} of " if op.count else ""
        return f"{seats}certificate {short(op.certificate_id)}"
    if kind == "move":
        return f"certificate {short(op.certificate_id)} → {op.target_license_server}"
    return "trusted storage"


def operation_pairs(style: Style, op: admin_pb2.Operation) -> list[tuple[str, str | Cell]]:
    kind = records.operation_kind(op.kind) + (" (offline, by file)" if op.offline else "")
    target = op.license_server + (f"  host {op.host_id}" if op.host_id else "")
    moved_to = op.target_license_server + (
        f"  host {op.target_host_id}" if op.target_host_id else ""
    )
    return [
        ("operation", op.operation_id),
        ("kind", kind),
        ("state", operation_state(op)),
        ("license server", target),
        ("moved to", moved_to),
        ("activation", op.activation_id),
        ("certificate", op.certificate_id),
        ("seats", str(op.count) if op.count else ""),
        ("last error", Cell(op.last_error, "bad")),
        ("started", clock(op.created_at, True) if op.HasField("created_at") else ""),
        ("updated", clock(op.updated_at, True) if op.HasField("updated_at") else ""),
    ]


def operation(style: Style, op: admin_pb2.Operation) -> str:
    return pairs(style, operation_pairs(style, op), indent="")


def operations(style: Style, ops: Sequence[admin_pb2.Operation]) -> str:
    if not ops:
        return "The journal is empty."
    rows: list[Row] = [
        [
            Cell(short(op.operation_id), "accent"),
            records.operation_kind(op.kind) + (" (file)" if op.offline else ""),
            operation_state(op),
            op.license_server,
            _operation_subject(op),
            clock(op.updated_at) if op.HasField("updated_at") else "",
        ]
        for op in ops
    ]
    text = table(
        style,
        [
            Column("Operation"),
            Column("Kind"),
            Column("State"),
            Column("License server"),
            Column("What"),
            Column("Updated"),
        ],
        rows,
    )
    stuck = [op for op in ops if op.last_error and op.state != admin_pb2.OPERATION_STATE_COMPLETED]
    if stuck:
        text += "\n\n" + "\n".join(
            f"{style.warn(short(op.operation_id))}: {op.last_error}" for op in stuck
        )
    return text


def activated(style: Style, reply: admin_pb2.ActivateResponse) -> str:
    c = reply.certificate.certificate
    head = style.ok("Activated") + (
        f" {c.count} x {c.feature} onto {reply.operation.license_server} (host {c.host_id})."
    )
    op = reply.operation
    details: list[tuple[str, str | Cell]] = [
        ("certificate", c.certificate_id),
        ("entitlement", f"{c.entitlement_id}  line {c.activation_id}"),
        ("expires", date_or(c.HasField("expires_at"), c.expires_at, "never")),
        ("returns", "per seat" if c.partial_return_allowed else "whole certificate"),
        ("operation", f"{op.operation_id} ({records.operation_state(op.state)})"),
    ]
    return head + "\n" + pairs(style, details)


def returned(style: Style, reply: admin_pb2.ReturnResponse, feature: str) -> str:
    op = reply.operation
    what = f" ({feature})" if feature else ""
    head = (
        style.ok("Returned")
        + f" certificate {op.certificate_id}{what} from {op.license_server} to the vendor."
    )
    details: list[tuple[str, str | Cell]] = [
        ("seats returned", str(op.count) if op.count else "all"),
        ("leases revoked", str(reply.revoked_leases) if reply.revoked_leases else ""),
    ]
    if reply.HasField("remaining"):
        kept = reply.remaining.certificate
        details.append(("kept", f"{kept.count} seat(s) as certificate {kept.certificate_id}"))
    details.append(("operation", f"{op.operation_id} ({records.operation_state(op.state)})"))
    return head + "\n" + pairs(style, details)


def repaired(style: Style, reply: admin_pb2.RepairResponse) -> str:
    head = style.ok("Repaired") + f" trusted storage of {reply.operation.license_server}."
    return "\n".join(
        [
            head,
            f"  operation {reply.operation.operation_id}",
            "",
            trust(style, reply.health, advise=False),
        ]
    )


def moved(style: Style, reply: admin_pb2.MoveResponse) -> str:
    op = reply.operation
    c = reply.certificate.certificate
    head = style.ok("Moved") + (
        f" {c.count} x {c.feature} from {op.license_server} to {op.target_license_server}."
    )
    details: list[tuple[str, str | Cell]] = [
        ("returned", f"certificate {op.certificate_id} (host {op.host_id})"),
        ("now", f"certificate {c.certificate_id} (host {c.host_id})"),
        ("operation", f"{op.operation_id} ({records.operation_state(op.state)})"),
    ]
    note = style.dim("Point the clients at the new address.")
    return head + "\n" + pairs(style, details) + "\n" + note


# ---------------------------------------------------------------------------------------
# Offline files
# ---------------------------------------------------------------------------------------


def exported(style: Style, reply: admin_pb2.ExportRequestResponse, path: str) -> str:
    op = reply.operation
    kind = records.operation_kind(op.kind)
    return "\n".join(
        [
            style.ok("Wrote") + f" the {kind} request to {path} ({len(reply.request_file)} bytes).",
            f"  operation {op.operation_id} ({records.operation_state(op.state)})",
            "",
            "Carry the file to a machine with Internet access and run there:",
            f"  tessera submit {path}",
        ]
    )


def submitted(style: Style, path: str, size: int) -> str:
    return "\n".join(
        [
            style.ok("Wrote") + f" the vendor's answer to {path} ({size} bytes).",
            "",
            "Carry it back to the site and run there:",
            f"  tessera import-response {path}",
        ]
    )


def imported(style: Style, op: admin_pb2.Operation) -> str:
    kind = records.operation_kind(op.kind)
    state = records.operation_state(op.state)
    head = (style.ok("Imported") if state == "completed" else style.warn("Imported")) + (
        f" the vendor's answer: {kind} {state} on {op.license_server}."
    )
    return head + "\n" + pairs(style, operation_pairs(style, op))


# ---------------------------------------------------------------------------------------
# The License Server: License Information, leases, trusted storage
# ---------------------------------------------------------------------------------------


def licenses(
    style: Style,
    target: str,
    host_id: str,
    features: Sequence[lpb.FeatureInformation],
    certificates: Sequence[lpb.InstalledCertificate],
) -> str:
    head = f"License Server {style.bold(target)} (host {host_id})"
    if not features and not certificates:
        return head + "\n\nNo licenses activated yet: `tessera activate` adds some."
    feature_rows: list[Row] = [
        [
            f.feature,
            str(f.activated),
            str(f.used),
            Cell(str(f.available), "warn" if f.activated and not f.available else ""),
            Cell(str(f.queued), "warn" if f.queued else ""),
            str(f.required),
            Cell("VIOLATION", "bad") if f.violation else Cell("no", "ok"),
        ]
        for f in features
    ]
    parts = [
        head,
        "",
        table(
            style,
            [
                Column("Feature"),
                Column("Activated", right=True),
                Column("Used", right=True),
                Column("Available", right=True),
                Column("Queued", right=True),
                Column("Required", right=True),
                Column("Violation"),
            ],
            feature_rows,
        ),
    ]
    withdrawn = [f for f in features if f.withdrawn]
    if withdrawn:
        parts += [
            "",
            *(
                style.bad(f"{f.feature}: {f.withdrawn} seat(s) withdrawn by a check-in")
                + f" ({f.withdrawn_reason}); `tessera trust` says more"
                for f in withdrawn
            ),
        ]
    if certificates:
        certificate_rows: list[Row] = [
            [
                Cell(short(i.certificate.certificate_id), "accent"),
                i.certificate.feature,
                str(i.certificate.count),
                records.license_kind(i.certificate.kind),
                i.certificate.entitlement_id,
                date_or(i.certificate.HasField("expires_at"), i.certificate.expires_at, "never"),
                "per seat" if i.certificate.partial_return_allowed else "whole",
            ]
            for i in certificates
        ]
        parts += [
            "",
            table(
                style,
                [
                    Column("Certificate"),
                    Column("Feature"),
                    Column("Seats", right=True),
                    Column("Kind"),
                    Column("Entitlement"),
                    Column("Expires"),
                    Column("Returns"),
                ],
                certificate_rows,
            ),
        ]
    violations = [f.feature for f in features if f.violation]
    if violations:
        parts += [
            "",
            style.bad("License violation: ")
            + f"fewer seats activated than required for {', '.join(violations)}.",
        ]
    return "\n".join(parts)


def leases(style: Style, entries: Sequence[lpb.LeaseEntry]) -> str:
    if not entries:
        return "Nobody holds or waits for a seat."
    rows: list[Row] = [
        [
            Cell(short(e.lease_id), "accent"),
            Cell("queued", "warn") if e.state == lpb.LEASE_STATE_QUEUED else Cell("held"),
            e.feature,
            str(e.count),
            e.client_host or "-",
            e.user or "-",
            e.display_name or "-",
            clock(e.since, True) if e.HasField("since") else "",
            clock(e.expires_at, True) if e.HasField("expires_at") else "",
        ]
        for e in entries
    ]
    return table(
        style,
        [
            Column("Lease"),
            Column("State"),
            Column("Feature"),
            Column("Seats", right=True),
            Column("Client host"),
            Column("User"),
            Column("Client"),
            Column("Since"),
            Column("Expires"),
        ],
        rows,
    )


_CERTIFICATE_TONES = {
    "trusted": "ok",
    "broken": "bad",
    "returning": "warn",
    "expired": "dim",
    "superseded": "bad",
    "check_in_overdue": "bad",
}


def trust(style: Style, health: lpb.TrustHealth, advise: bool = True) -> str:
    if health.healthy:
        state = style.ok("healthy")
    elif health.check_in.withdrawn_seats and not health.broken_seats:
        state = style.bad("NOT SERVING")  # check-ins withdrew seats; nothing is broken
    else:
        state = style.bad("BROKEN")
    sealed = (
        ""
        if health.sealed_host_id in ("", health.host_id)
        else f", sealed to {style.warn(health.sealed_host_id)}"
    )
    lines = [
        f"Trusted storage: {state} (host {health.host_id}{sealed})",
        f"Seats serving {health.serving_seats}, broken {health.broken_seats}"
        + (f"; checked {clock(health.checked_at, True)}" if health.HasField("checked_at") else ""),
    ]
    if health.certificates:
        # A storage-wide cause is told once, under Problems, not on every row.
        told = " ".join(health.problems)
        rows: list[Row] = [
            [
                Cell(short(c.certificate_id), "accent"),
                c.feature,
                str(c.count),
                Cell(
                    records.certificate_state(c.state),
                    _CERTIFICATE_TONES.get(records.certificate_state(c.state), ""),
                ),
                c.cause or "-",
                "" if c.detail in told else c.detail,
            ]
            for c in health.certificates
        ]
        lines += [
            "",
            table(
                style,
                [
                    Column("Certificate"),
                    Column("Feature"),
                    Column("Seats", right=True),
                    Column("State"),
                    Column("Cause"),
                    Column("Detail"),
                ],
                rows,
            ),
        ]
    if health.problems:
        lines += ["", "Problems:", *(f"  - {problem}" for problem in health.problems)]
    check_in = check_in_line(style, health.check_in)
    if check_in:
        lines += ["", check_in]
    if health.repair_advice and not health.broken_seats:
        # Only check-ins keep certificates from serving: a repair would not help.
        lines += ["", health.repair_advice]
    elif health.repair_advice:
        lines += ["", f"A repair would: {health.repair_advice}"]
        if advise:
            lines.append(style.dim("Run `tessera repair` (needs the vendor; at most 4 a year)."))
    return "\n".join(lines)


def check_in_line(style: Style, status: lpb.CheckInStatus) -> str:
    """Where the License Server stands with the vendor's check-in policy, in one line;
    empty when no check-in is needed and none found anything."""
    last = (
        f"last check-in {clock(status.last_checked_at)}"
        if status.HasField("last_checked_at")
        else "never checked in"
    )
    if status.superseded:
        by = status.superseded_by_host_id or "another host"
        return style.bad("SUPERSEDED") + (
            f": the vendor re-bound this License Server's licenses to host {by}"
            + (f" on {clock(status.superseded_at)}" if status.HasField("superseded_at") else "")
            + f"; {status.withdrawn_seats} seat(s) stopped serving ({last})"
        )
    if not status.required:
        if not status.withdrawn_seats:
            return ""
        return f"Check-in: {last}; {status.withdrawn_seats} seat(s) withdrawn"
    due = f"next due {clock(status.due_at)}, seats stop {clock(status.deadline)} without one"
    withdrawn = (
        style.bad(f"; {status.withdrawn_seats} seat(s) withdrawn") if status.withdrawn_seats else ""
    )
    return f"Check-in with the vendor: {last}; {due}{withdrawn}"


def checked_in(style: Style, reply: admin_pb2.CheckInResponse, address: str) -> str:
    status = reply.status
    if status.superseded:
        head = style.bad("Superseded:") + f" {address} (host {reply.host_id}) checked in."
    elif status.withdrawn_seats:
        head = style.warn("Checked in") + f" {address} (host {reply.host_id})."
    else:
        head = style.ok("Checked in") + f" {address} (host {reply.host_id}): current."
    return head + "\n" + (check_in_line(style, status) or "No check-in policy applies.")


def registration(style: Style, r: apb.Registration) -> str:
    if not r.organization:
        return (
            "No registration details yet; the vendor records them with every activation:\n"
            '  tessera registration set --organization "…" --contact-name "…" --email …'
        )
    return "Registration details sent with every activation:\n" + pairs(
        style,
        [
            ("organization", r.organization),
            ("contact", r.contact_name),
            ("e-mail", r.email),
            ("phone", r.phone),
            ("site", r.site),
        ],
    )


# ---------------------------------------------------------------------------------------
# Vendor staff
# ---------------------------------------------------------------------------------------


def activations(style: Style, items: Sequence[apb.Activation]) -> str:
    if not items:
        return "No activations."
    tones = {"active": "ok", "returned": "dim", "force_returned": "warn"}
    rows: list[Row] = [
        [
            Cell(short(a.certificate_id), "accent"),
            a.entitlement_id,
            a.feature,
            str(a.count),
            a.host_id,
            Cell(
                records.activation_state(a.state), tones.get(records.activation_state(a.state), "")
            ),
            clock(a.activated_at) if a.HasField("activated_at") else "",
        ]
        for a in items
    ]
    return table(
        style,
        [
            Column("Certificate"),
            Column("Entitlement"),
            Column("Feature"),
            Column("Seats", right=True),
            Column("Host"),
            Column("State"),
            Column("Activated"),
        ],
        rows,
    )


def audit_log(style: Style, reply: apb.GetAuditLogResponse) -> str:
    if not reply.entries:
        return "No audit entries."
    rows: list[Row] = [
        [
            str(e.sequence),
            clock(e.at, True) if e.HasField("at") else "",
            Cell(e.action, "bad" if e.action.endswith("refused") else ""),
            e.subject,
            e.actor,
        ]
        for e in reply.entries
    ]
    text = table(
        style,
        [
            Column("#", right=True),
            Column("At"),
            Column("Action"),
            Column("Subject"),
            Column("Actor"),
        ],
        rows,
    )
    if reply.next_after_sequence:
        text += "\n\n" + style.dim(
            f"More entries: tessera vendor audit --after {reply.next_after_sequence}"
        )
    return text


def audit_verified(style: Style, reply: apb.VerifyAuditLogResponse) -> str:
    head = f"head #{reply.head_sequence} {reply.head_hash.hex()}"
    if reply.intact:
        return style.ok("Audit log intact") + f": {reply.entries_checked} entries checked; {head}"
    return "\n".join(
        [
            style.bad("Audit log NOT intact")
            + f": first bad entry #{reply.first_bad_sequence}: {reply.problem}",
            f"{reply.entries_checked} entries checked; {head}",
        ]
    )


def force_returned(style: Style, a: apb.Activation) -> str:
    return (
        style.ok("Credited back")
        + f" {a.activated_count or a.count} x {a.feature} of {a.entitlement_id} from host "
        f"{a.host_id} (certificate {a.certificate_id}); the seats can be activated again."
    )


def vendor_keys(style: Style, keys: Sequence[apb.VendorPublicKey]) -> str:
    rows: list[Row] = [
        [
            Cell(k.key_id, "accent"),
            Cell("signing", "ok") if k.active else Cell("verifies only", "dim"),
            clock(k.created_at) if k.HasField("created_at") else "",
            k.public_key.hex(),
        ]
        for k in keys
    ]
    return table(
        style,
        [Column("Key ID"), Column("Role"), Column("Created"), Column("Public key (hex)")],
        rows,
    )
