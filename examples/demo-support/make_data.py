"""Writes the demo data set: support questions and answers for Nimbus Notes, a fictional note-taking app.

Run from the repository root: python examples/demo-support/make_data.py (the output is committed).
"""

import json
import random
from pathlib import Path

from server.trainer.demo_model import corpus

# (ways a customer asks, the answer support gives)
TOPICS = [
    (["How do I export my notes?", "Can I export notes to PDF?", "How can I download all my notes?"],
     "In Nimbus Notes, open Settings, choose Export, and pick PDF or Markdown."),
    (["How do I share a notebook?", "Can I share a notebook with my team?", "How do I invite someone to a notebook?"],
     "Open the notebook, press Share, and enter your teammate's email."),
    (["How much does Nimbus Pro cost?", "What is the price of the Pro plan?", "How expensive is Nimbus Pro?"],
     "Nimbus Pro costs 6 dollars a month or 60 dollars a year."),
    (["Does Nimbus Notes work offline?", "Can I use the app without internet?", "Is there an offline mode?"],
     "Yes. Notes you opened recently are kept offline and sync when you reconnect."),
    (["How do I restore a deleted note?", "I deleted a note by mistake, can I get it back?",
      "Where do deleted notes go?"],
     "Deleted notes stay in Trash for 30 days. Open Trash and press Restore."),
    (["How do I turn on two-factor authentication?", "How can I enable 2FA?", "Can I protect my account with 2FA?"],
     "Go to Settings, then Security, and switch on Two-factor authentication."),
    (["What is the size limit for attachments?", "How big can an attachment be?", "Is there a file size limit?"],
     "Each attachment can be up to 25 MB on Free and 200 MB on Pro."),
    (["How do I change the app theme?", "Can I use dark mode?", "How do I switch to a dark theme?"],
     "Open Settings, choose Appearance, and pick Light, Dark or System."),
    (["How do I cancel Nimbus Pro?", "How can I stop my subscription?", "I want to cancel my plan."],
     "Open Settings, choose Billing, and press Cancel subscription. Pro stays active until the period ends."),
    (["Which platforms does Nimbus support?", "Is there a Nimbus app for Android?", "Can I use Nimbus on Linux?"],
     "Nimbus Notes runs on Windows, macOS, Linux, iOS, Android and the web."),
    (["How do I add a tag to a note?", "Can I tag my notes?", "How do tags work?"],
     "Type # followed by the tag name anywhere in the note."),
    (["How do I search inside attachments?", "Can Nimbus search PDFs?", "Does search look inside files?"],
     "Pro searches the text inside PDFs and images. Use the search bar as usual."),
    (["How do I sync between devices?", "My notes are not syncing.", "How does sync work?"],
     "Sign in with the same account on each device. Sync runs every minute and on every save."),
    (["How do I contact Nimbus support?", "Where can I get help?", "How do I reach a person?"],
     "Write to support@nimbus.example or use Help, then Chat, in the app."),
    (["Can I get a refund for Pro?", "Do you give refunds?", "I want my money back."],
     "Pro can be refunded within 14 days of purchase. Contact support with your receipt."),
    (["How do I lock a note?", "Can I password protect a note?", "How do I hide a private note?"],
     "Open the note menu and press Lock. Locked notes need your passcode to open."),
    (["How many devices can I use?", "Is there a device limit?", "Can I use Nimbus on three devices?"],
     "Free works on two devices. Pro has no device limit."),
    (["How do I import notes from another app?", "Can I import from Evernote?", "How do I move my notes to Nimbus?"],
     "Open Settings, choose Import, and select an ENEX, Markdown or text file."),
    (["How do I create a checklist?", "Can I make a to-do list?", "How do checkboxes work?"],
     "Type [] at the start of a line to make a checkbox."),
    (["How do I print a note?", "Can I print from Nimbus?", "Is printing supported?"],
     "Open the note menu and press Print, or press Ctrl+P."),
    (["Where is my data stored?", "Which country hosts my notes?", "Where are the Nimbus servers?"],
     "Your notes are stored encrypted in data centers in the European Union."),
    (["How do I delete my account?", "Can I remove my Nimbus account?", "How do I erase all my data?"],
     "Open Settings, choose Account, and press Delete account. Everything is erased within 7 days."),
    (["How do I add a reminder?", "Can a note remind me?", "How do I set an alarm on a note?"],
     "Open the note menu, press Remind me, and choose a date and time."),
    (["How do I change my email address?", "Can I update my login email?", "My email changed, what do I do?"],
     "Open Settings, choose Account, and press Change email. Confirm the link we send you."),
    (["How do I use Nimbus with my team?", "Is there a team plan?", "Do you have a business plan?"],
     "Nimbus Teams costs 8 dollars per person a month and adds shared spaces and admin controls."),
]
OPENERS = ["", "Hi, ", "Hello. ", "Quick question: ", "Hey support, "]
CLOSERS = ["", " Thanks!", " Thank you.", " Please help."]


def main(out: Path = Path(__file__).parent, seed: int = 7) -> None:
    rng = random.Random(seed)
    rows = []
    for questions, answer in TOPICS:
        for q in questions:
            for _ in range(3):
                user = f"{rng.choice(OPENERS)}{q}{rng.choice(CLOSERS)}".strip()
                rows.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]})
    # The other two accepted formats, for the same domain.
    rows += [{"prompt": q, "completion": a} for qs, a in TOPICS[:8] for q in qs[:1]]
    rows += [{"instruction": "Answer the customer's question.", "input": qs[1], "output": a} for qs, a in TOPICS[8:16]]
    rng.shuffle(rows)
    with open(out / "support.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    (out / "general.txt").write_text("\n".join(corpus(seed=1234, sentences=400)) + "\n")
    print(f"wrote {len(rows)} rows")


if __name__ == "__main__":
    main()
