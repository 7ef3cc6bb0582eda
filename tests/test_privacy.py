"""The sensitive-data detector: what it flags, what it must leave alone, and its API contract.

All values are synthetic: documented test card numbers, AWS's example key id, the 555-01xx
fictional phone range, made-up tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from streamllm.routing.privacy import (
    BUILTIN_KINDS,
    Finding,
    SensitiveDataDetector,
    _merge_overlaps,
)

DETECTOR = SensitiveDataDetector()

OPENAI_KEY = "sk-Tst0a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8s9T0uVwZ"
OPENAI_PROJECT_KEY = "sk-proj-Ab12Cd34Ef56Gh78Ij90Kl12Mn34Op56Qr78St90_Uv12-Wz34"
ANTHROPIC_KEY = "sk-ant-api03-Zq9Wm8Rt7Yp6Lk5Jh4Gf3Ds2Aa1Bb0Cc9Dd8Ee7Ff6Gg5-Hh4Ii3AA"
GITHUB_TOKEN = "ghp_1a2B3c4D5e6F7g8H9i0J1k2L3m4N5o6P7q8R"
GITHUB_PAT = "github_pat_11ABCDEFG0a1b2c3d4e5f6g7_h8i9j0k1l2m3n4o5p6q7r8s9t0u1v2w3x4y5z6A7B8C9"
SLACK_TOKEN = "xoxb-1234567890-1234567890123-AbCdEfGhIjKlMnOpQrStUvWz"
GOOGLE_KEY = "AIzaSyD1a2B3c4D5e6F7g8H9i0J1k2L3m4N5o6P"
HF_TOKEN = "hf_a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7"
STRIPE_KEY = "sk_live_51H8a1B2c3D4e5F6g7H8i9J0"
STRIPE_RESTRICTED_KEY = "rk_live_51H8z9Y8x7W6v5U4t3S2r1Q0"
# The example token from jwt.io.
JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwi"
    "aWF0IjoxNTE2MjM5MDIyfQ.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
)
PEM_BLOCK = (
    "-----BEGIN RSA PRIVATE KEY-----\n"
    "MIIEowIBAAKCAQEAsyntheticsyntheticsyntheticsyntheticsynthetic0123\n"
    "c3ludGhldGljIGtleSBtYXRlcmlhbCBmb3IgdGVzdHMgb25seQ==\n"
    "-----END RSA PRIVATE KEY-----"
)


def spans_of(text: str, kind: str) -> list[str]:
    return [text[f.start : f.end] for f in DETECTOR.scan(text) if f.kind == kind]


# (kind, text, the exact substring that must be reported)
DETECTED = [
    # email
    ("email", "Please reply to jane.doe@example.com by Friday.", "jane.doe@example.com"),
    ("email", "cc: j.doe+arxiv-alerts@mail.example.co.uk", "j.doe+arxiv-alerts@mail.example.co.uk"),
    ("email", "Contact BOB.SMITH@EXAMPLE.ORG for access.", "BOB.SMITH@EXAMPLE.ORG"),
    ("email", "send the logs to first_last@cs.example.edu.", "first_last@cs.example.edu"),
    ("email", "<a href='mailto:alice@example.net'>mail</a>", "alice@example.net"),
    ("email", "Author: Ada Lovelace <ada@example.org>", "ada@example.org"),
    # phone
    ("phone", "Call our London office on +44 20 7946 0958 tomorrow.", "+44 20 7946 0958"),
    ("phone", "US support: +1-202-555-0143.", "+1-202-555-0143"),
    ("phone", "Berlin: +49 (0)30 123456, ask for Jan.", "+49 (0)30 123456"),
    ("phone", "My cell is (202) 555-0143 if it's urgent.", "(202) 555-0143"),
    ("phone", "Text 202-555-0143 when you land.", "202-555-0143"),
    ("phone", "Fax: 202.555.0143", "202.555.0143"),
    ("phone", "Toll free 1-800-555-0199 (24h).", "1-800-555-0199"),
    ("phone", "whatsapp me at +15555550143", "+15555550143"),
    ("phone", "Reach me on +1 (202) 555-0199.", "+1 (202) 555-0199"),
    ("phone", "Paris: +33 1 23 45 67 89", "+33 1 23 45 67 89"),
    ("phone", "call me (202-555-0143) after six", "202-555-0143"),
    # national_id
    ("national_id", "Her SSN is 123-45-6789, please update the form.", "123-45-6789"),
    ("national_id", "SSN: 219-09-9999.", "219-09-9999"),
    ("national_id", "National Insurance number AB 12 34 56 C on the payslip.", "AB 12 34 56 C"),
    ("national_id", "NI no. JG103759A", "JG103759A"),
    ("national_id", "My SIN is 046 454 286.", "046 454 286"),
    ("national_id", "SIN 130-692-544 on the T4 slip", "130-692-544"),
    # card
    ("card", "Charge it to 4111 1111 1111 1111, exp 12/30.", "4111 1111 1111 1111"),
    ("card", "visa 4111 1111 1111 1111 12/30 cvv 123", "4111 1111 1111 1111"),
    ("card", "visa 4111 1111 1111 1111 123 (that's the cvv)", "4111 1111 1111 1111"),
    ("card", "card number: 5555-5555-5555-4444", "5555-5555-5555-4444"),
    ("card", "Amex 3782 822463 10005 please", "3782 822463 10005"),
    ("card", "pan=4012888888881881&cvv=123", "4012888888881881"),
    ("card", "Discover 6011 1111 1111 1117.", "6011 1111 1111 1117"),
    ("card", "Mastercard 2-series test card 2223003122003222", "2223003122003222"),
    ("card", "Amex 378282246310005 on file", "378282246310005"),
    # api_key: formats
    ("api_key", f"client = OpenAI(api_key='{OPENAI_KEY}')", OPENAI_KEY),
    ("api_key", f"my key {OPENAI_PROJECT_KEY} stopped working", OPENAI_PROJECT_KEY),
    ("api_key", f"ANTHROPIC_API_KEY={ANTHROPIC_KEY}", ANTHROPIC_KEY),
    ("api_key", "aws_access_key_id = AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLE"),
    ("api_key", "temporary creds ASIAIOSFODNN7EXAMPLE expired", "ASIAIOSFODNN7EXAMPLE"),
    ("api_key", f"git clone https://{GITHUB_TOKEN}@github.com/org/repo", GITHUB_TOKEN),
    ("api_key", f"GH_TOKEN={GITHUB_PAT}", GITHUB_PAT),
    ("api_key", f"the fine-grained PAT {GITHUB_PAT} has repo scope", GITHUB_PAT),
    ("api_key", f"slack bot token {SLACK_TOKEN} in the config", SLACK_TOKEN),
    ("api_key", f"maps url ...&key={GOOGLE_KEY}&v=3", GOOGLE_KEY),
    ("api_key", f"huggingface-cli login --token {HF_TOKEN}", HF_TOKEN),
    ("api_key", f"stripe.api_key = '{STRIPE_KEY}'", STRIPE_KEY),
    ("api_key", f"restricted key {STRIPE_RESTRICTED_KEY}", STRIPE_RESTRICTED_KEY),
    ("api_key", f"the cookie was session={JWT}", JWT),
    (
        "api_key",
        "curl -H 'Authorization: Bearer 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b' https://x",
        "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b",
    ),
    # api_key: assignments
    ("api_key", 'api_key = "a8f5f167f44f4964e6c998dee827110c"', "a8f5f167f44f4964e6c998dee827110c"),
    ("api_key", "password: Tr0ub4dor&3xyz", "Tr0ub4dor&3xyz"),
    ("api_key", "secret=9f86d081884c7d659a2f", "9f86d081884c7d659a2f"),
    ("api_key", "https://host/api?token=abc123def456ghi789&page=2", "abc123def456ghi789"),
    ("api_key", '{"client_secret": "q8Zr2LmN5vT0wXy3"}', "q8Zr2LmN5vT0wXy3"),
    ("api_key", "DB_PASSWORD=hunter2hunter2", "hunter2hunter2"),
    ("api_key", "const apiKey = 'correcthorsebatterystaple';", "correcthorsebatterystaple"),
    (
        "api_key",
        "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCY0q1w2e3r",
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCY0q1w2e3r",
    ),
    # private_key
    ("private_key", f"my deploy key:\n{PEM_BLOCK}\nwhy is it rejected?", PEM_BLOCK),
    (
        "private_key",
        "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA",
        "-----BEGIN OPENSSH PRIVATE KEY-----",
    ),
    ("private_key", "key.pem begins -----BEGIN PRIVATE KEY-----", "-----BEGIN PRIVATE KEY-----"),
    ("private_key", "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEE", "-----BEGIN EC PRIVATE KEY-----"),
    (
        "private_key",
        "PuTTY-User-Key-File-3: ssh-ed25519\nEncryption: none",
        "PuTTY-User-Key-File-3: ssh-ed25519",
    ),
]


@pytest.mark.parametrize(("kind", "text", "secret"), DETECTED)
def test_detects_sensitive_data_with_exact_span(kind: str, text: str, secret: str) -> None:
    assert secret in spans_of(text, kind)


@pytest.mark.parametrize("kind", BUILTIN_KINDS)
def test_every_builtin_kind_is_covered_by_several_sentences(kind: str) -> None:
    assert sum(1 for k, _, _ in DETECTED if k == kind) >= 4


@pytest.mark.parametrize(
    "text",
    [
        "card 4111 1111 1111 1112",  # Luhn fails
        "card 5555-5555-5555-4445",
        "card 4012888888881882",
        "card 3782 822463 10006",
        "card 1234 5678 9012 3456",  # no issuer
        "card 9111 1111 1111 1115",  # Luhn-valid, unknown issuer
        "card 4111 1111 1111 1111 1111 1",  # too many digits
        "card 41111111111111111111",  # too many digits
        "sizes 4111 1111 1111 1111 4096 bytes",  # a row of a table, not a card
    ],
)
def test_invalid_card_numbers_are_not_flagged(text: str) -> None:
    assert spans_of(text, "card") == []


@pytest.mark.parametrize(
    "text",
    [
        "SSN 000-12-3456",  # area 000
        "SSN 666-12-3456",  # area 666
        "SSN 912-34-5678",  # area 9xx
        "SSN 123-00-4567",  # group 00
        "SSN 123-45-0000",  # serial 0000
        "NINO QQ 12 34 56 C",  # Q never a first letter
        "NINO GB 12 34 56 A",  # unissued prefix
        "NINO AO 12 34 56 A",  # O never a second letter
        "NINO AB 12 34 56 E",  # suffix beyond D
        "SIN 046 454 287",  # Luhn fails
        "SIN 123 456 789",  # Luhn fails
    ],
)
def test_invalid_national_ids_are_not_flagged(text: str) -> None:
    assert spans_of(text, "national_id") == []


@pytest.mark.parametrize(
    "text",
    [
        'api_key = "<your-key>"',
        'api_key="xxxxxxxxxxxxxxxxxxxx"',
        "password: ************",
        "OPENAI_API_KEY=YOUR_API_KEY",
        'token = "..."',
        "export OPENAI_API_KEY=sk-...",
        "OPENAI_API_KEY=sk-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
        "GITHUB_TOKEN=ghp_xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
        "aws_access_key_id = AKIAXXXXXXXXXXXXXXXX",
        "Authorization: Bearer <token>",
        'curl -H "Authorization: Bearer $OPENAI_API_KEY" https://api.example.com',
        "Authorization: Bearer YOUR_ACCESS_TOKEN_GOES_HERE",
        "secret: ${DB_SECRET_FROM_VAULT}",
        "password: {{ vault_db_password }}",
        "api_key = os.environ['OPENAI_API_KEY']",
        "client = OpenAI(api_key=settings.openai_api_key)",
        "token=os.getenv('HF_TOKEN')",
        "api_key = config.llm.openai_key_v2",
        "password = get_db_password_v2()",
        "secret: /run/secrets/db_password_2024",
        "token: ~/.cache/huggingface/token_v2",
        'password = "changeme_changeme"',
        "secret_key = 'replace-with-a-real-secret'",
        "HF_TOKEN=hf_...",
    ],
)
def test_placeholders_and_references_are_not_flagged(text: str) -> None:
    assert DETECTOR.scan(text) == []


ORDINARY = [
    # numbers, dates, versions, identifiers
    "We trained for 3 epochs on 1234567890 rows collected in 2020-2021.",
    "The release is dated 2024-05-01 (05/01/2024 in US notation, 01.05.2024 in German).",
    "Use Python 3.11.7 with CUDA 12.1.105 and cuDNN 8.9.2.26 on the A100 nodes.",
    "See doi:10.1038/s41586-020-2649-2 and https://doi.org/10.1145/3458817.3476209 for details.",
    "The method follows arXiv:2101.00001v2 and arXiv 1706.03762.",
    "Cite ISBN 978-0-306-40615-7 (ISBN-10 0-306-40615-2) and ISBN 9780306406157.",
    "The head node is 192.168.100.200, the gateway 10.0.0.1:8080, and 172.16.254.1/24.",
    "n=1234567, mean 0.4321, p < 0.0001 (p = 3.2e-05), Cohen's d = 1.23.",
    "Submitted batch job 48213377; job 48213378 is pending; array 48213379_[1-100]%10.",
    "The budget is $1,234,567.89 (EUR 2.500.000,00), up 12.5% from 2023.",
    "The site is at 40.712812, -74.006015 (or +40.712812 latitude) and (51.5074, -0.1278).",
    "Accuracy improved from 78.3% to 81.2% (+2.9 pp, p=0.003) over 5 seeds.",
    "Timestamps: 12:34:56.789, epoch 1714557600123, and 2024-05-01T12:00:00+02:00.",
    "A 4096 x 4096 x 128 tensor has 2147483648 elements; 8 GPUs x 80 GB = 640 GB.",
    "sha256 e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855 matches.",
    "Revert commit 9fceb02d0ae598e95dc970b74767f19372d61af8 and tag v2.3.1-rc4.",
    "Request id 123e4567-e89b-12d3-a456-426614174000 failed after 30000 ms.",
    "Run with --nodes=4 --ntasks-per-node=128 --time=02:00:00 --mem=512G.",
    "Nodes nid[001234-001456] give 128 nodes x 64 cores = 8192 ranks.",
    "The years 1999, 2000, 2001 and the range 2020-2024 are excluded.",
    "Pages 1234-1256 in vol. 45(3), Nature 585, 357-362 (2020).",
    "The SI-formatted population was 1 234 567 890 in the model.",
    "Counts: 250 300 1000 2000 3500 for the five bins.",
    "IPv6 address 2001:db8::8a2e:370:7334 on eth0.",
    "MNIST has 60000 training images of 28x28 pixels and 10000 test images.",
    "Grant NSF-2138259 and award 2020-123456 fund this work.",
    "ORCID 0000-0002-1825-0097; CUDA_VISIBLE_DEVICES=0,1,2,3; OMP_NUM_THREADS=64.",
    "The zip code 20500-0003 and +2.5 dB gain; C++17 and C++20 both work.",
    "Load average 12.34 15.67 18.90 on login01 after 4 hours.",
    # e-mail-like things that are not e-mail addresses
    "Decorate it with @dataclass(frozen=True) and @pytest.mark.parametrize('x', [1, 2]).",
    "@app.get('/v1/models') returns the catalogue; ping @alice and @bob-smith.",
    "Ship icon@2x.png and logo@3x.jpg with the app.",
    "git clone git@github.com:org/repo.git && cd repo",
    "pip install 'torch==2.1.0+cu118' then spack install hdf5@1.12.2 %gcc@12.2.0 ^openmpi@4.1.5",
    "In numpy, y = X@W.T + b and z = A@B.sum(axis=0).",
    "The service runs as user@localhost on port 8000.",
    "uses: actions/checkout@v4 and npm i lodash@4.17.21",
    # code and configuration that names secrets without containing any
    "tokenizer.pad_token = tokenizer.eos_token",
    "max_tokens=4096, temperature=0.7, top_p=0.95, num_tokens: 1234567890123",
    "headers = {'Authorization': f'Bearer {api_key}'}",
    "from huggingface_hub import hf_hub_download; hf_hub_download(repo_id='org/model')",
    ("-----BEGIN CERTIFICATE-----\nMIIDdzCCAl+gAwIBAgIEAgAAuTANBgkqhkiG9w0BAQUFADBa\n"
    "-----END CERTIFICATE-----"),
    "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----",
    ("Paste ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl into"
    " authorized_keys."),
    "LD_LIBRARY_PATH=/opt/cray/pe/lib64:/usr/lib64 and secret_path: /run/secrets/db",
    "Use sk-learn-style estimators or the scikit-learn API; task-specific heads help.",
    "GitHub tokens start with ghp_ and AWS key ids with AKIA; never paste them here.",
    # chat prose
    "The password policy requires at least 12 characters and one digit.",
    "Token: roughly four characters of English text on average.",
    "Top secret: the learning-rate warmup matters more than the schedule.",
    "My thesis is due on 2024-09-30; the defence is in room 3.141 at 14:00.",
    "Could you explain why softmax is scaled by the square root of the key dimension?",
    "Is 2^31 - 1 = 2147483647 a Mersenne prime? And what about 4111?",
]


@pytest.mark.parametrize(
    "token",
    [
        OPENAI_KEY, OPENAI_PROJECT_KEY, ANTHROPIC_KEY, "AKIAIOSFODNN7EXAMPLE", GITHUB_TOKEN,
        GITHUB_PAT, SLACK_TOKEN, GOOGLE_KEY, HF_TOKEN, STRIPE_KEY, STRIPE_RESTRICTED_KEY, JWT,
    ],
)  # fmt: skip
def test_token_formats_are_recognised_without_any_context(token: str) -> None:
    text = f"oops, I pasted {token} into the chat"
    assert spans_of(text, "api_key") == [token]


@pytest.mark.parametrize(
    "text",
    [
        "task-abcdefghij0123456789abcdefghij is a job name",  # `sk-` inside a word
        "my_hf_a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7 is glued onto a name",
        "monkey = 'a8f5f167f44f4964e6c998dee827110c'",  # "key" without api/secret/...
        "sort_key = 'a8f5f167f44f4964e6c998dee827110c'",
        "mytoken = 'a8f5f167f44f4964e6c998dee827110c'",
    ],
)
def test_token_like_text_inside_other_words_is_not_flagged(text: str) -> None:
    assert DETECTOR.scan(text) == []


def test_ordinary_corpus_is_large_enough() -> None:
    assert len(ORDINARY) >= 40


@pytest.mark.parametrize("text", ORDINARY)
def test_ordinary_text_is_not_flagged(text: str) -> None:
    assert DETECTOR.scan(text) == []


def test_ordinary_corpus_joined_into_one_message_is_not_flagged() -> None:
    assert DETECTOR.scan("\n".join(ORDINARY)) == []


def test_findings_are_ordered_by_start_across_kinds() -> None:
    text = (
        f"Mail jane.doe@example.com, call (202) 555-0143, card 4111 1111 1111 1111, "
        f"key {OPENAI_KEY}, SSN 123-45-6789."
    )
    findings = DETECTOR.scan(text)
    assert [f.kind for f in findings] == ["email", "phone", "card", "api_key", "national_id"]
    assert [f.start for f in findings] == sorted(f.start for f in findings)


def test_one_secret_matched_by_two_rules_is_reported_once() -> None:
    text = f"export OPENAI_API_KEY={OPENAI_PROJECT_KEY}"
    assert DETECTOR.scan(text) == [Finding("api_key", text.index("sk-"), len(text))]


def test_overlapping_findings_of_one_kind_merge_into_their_union() -> None:
    # Built-in rules rarely overlap partially, so exercise the merge step directly.
    findings = [Finding("api_key", 10, 30), Finding("email", 12, 20), Finding("api_key", 0, 15)]
    assert _merge_overlaps(findings) == [Finding("api_key", 0, 30), Finding("email", 12, 20)]


def test_private_key_span_covers_the_whole_block() -> None:
    text = f"here it is:\n{PEM_BLOCK}\nthanks"
    (finding,) = DETECTOR.scan(text)
    assert text[finding.start : finding.end] == PEM_BLOCK


def test_custom_pattern_reports_its_own_kind() -> None:
    detector = SensitiveDataDetector(custom_patterns={"employee_id": r"\bEMP-\d{6}\b"})
    text = "Ticket raised by EMP-004211 about EMP-12 access."
    assert detector.scan(text) == [Finding("custom:employee_id", 17, 27)]


def test_custom_patterns_run_alongside_builtin_kinds() -> None:
    detector = SensitiveDataDetector(custom_patterns={"project": r"PRJ-[A-Z]{3}"})
    text = "PRJ-ABC owner is jane.doe@example.com"
    assert [f.kind for f in detector.scan(text)] == ["custom:project", "email"]


def test_zero_width_custom_matches_mark_nothing() -> None:
    detector = SensitiveDataDetector(custom_patterns={"maybe_x": r"x*"}, kinds=[])
    assert detector.scan("abc") == []
    assert detector.scan("axxb") == [Finding("custom:maybe_x", 1, 3)]


def test_invalid_custom_regex_raises_value_error_naming_it() -> None:
    with pytest.raises(ValueError, match="badly_bracketed"):
        SensitiveDataDetector(custom_patterns={"fine": r"\d+", "badly_bracketed": r"[a-z"})


def test_kinds_restricts_builtin_detection() -> None:
    text = f"jane.doe@example.com, 202-555-0143, 4111 1111 1111 1111, {OPENAI_KEY}"
    only_email = SensitiveDataDetector(kinds=["email"])
    assert [f.kind for f in only_email.scan(text)] == ["email"]
    no_email = SensitiveDataDetector(kinds=[k for k in BUILTIN_KINDS if k != "email"])
    assert [f.kind for f in no_email.scan(text)] == ["phone", "card", "api_key"]
    assert SensitiveDataDetector(kinds=[]).scan(text) == []


def test_unknown_kind_is_rejected() -> None:
    with pytest.raises(ValueError, match="passport"):
        SensitiveDataDetector(kinds=["email", "passport"])


@pytest.mark.parametrize(("kind", "text", "secret"), DETECTED[::6])
def test_findings_hold_no_matched_text(kind: str, text: str, secret: str) -> None:
    assert [field.name for field in dataclasses.fields(Finding)] == ["kind", "start", "end"]
    findings = DETECTOR.scan(text)
    assert findings
    for shown in (repr(findings), str(findings), repr(dataclasses.asdict(findings[0]))):
        assert secret not in shown


def test_spans_stay_exact_after_text_whose_lower_case_is_longer() -> None:
    # "İ".lower() is two characters; spans must still index the original text.
    text = f"İİİ İstanbul ofisi: api_key = '{OPENAI_KEY}'"
    assert spans_of(text, "api_key") == [OPENAI_KEY]


def test_first_returns_earliest_finding_of_first_text_with_one() -> None:
    texts = [
        "What is the capital of France?",
        "Ok. My number is 202-555-0143 and my mail jane.doe@example.com.",
        f"and my key is {OPENAI_KEY}",
    ]
    finding = DETECTOR.first(texts)
    assert finding is not None and finding.kind == "phone"
    assert texts[1][finding.start : finding.end] == "202-555-0143"


def test_first_stops_at_the_first_text_with_a_finding() -> None:
    def texts() -> Iterator[str]:
        yield "nothing here, just 2024-05-01"
        yield "card 4111 1111 1111 1111"
        raise AssertionError("first() scanned past the text with a finding")

    finding = DETECTOR.first(texts())
    assert finding is not None and finding.kind == "card"


def test_first_returns_none_when_nothing_is_sensitive() -> None:
    assert DETECTOR.first(ORDINARY[:10]) is None
    assert DETECTOR.first([]) is None
